"""Tests for dsrl.py and eval.py: offline, CPU, a few minutes.  Run:  python -m pytest -q test_dsrl.py

Everything loads a tiny Qwen3 (2 layers, hidden 64) with a character-level ChatML tokenizer that the
fixtures build and save with `save_pretrained`, exactly as a user's checkpoint would be loaded.
The tiny model is briefly trained to answer "\\boxed{1}" or "\\boxed{2}" at random, so that groups hold
right and wrong answers and every mode has real advantages and gradients to work with.
"""
import ast
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

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# course/grade.py grades a student's copy: DSRL_UNDER_TEST names its dsrl.py (its eval.py and grader.py sit beside it)
CODE = os.path.dirname(os.path.abspath(os.environ.get("DSRL_UNDER_TEST") or os.path.join(HERE, "dsrl.py")))
sys.path.insert(0, CODE)
import dsrl  # noqa: E402
import grader  # noqa: E402
import eval as evaluator  # noqa: E402  (our eval.py, not the builtin function)
from dsrl import last_boxed, math_reward, official_reward, strip_string  # noqa: E402


def reward_outcome(response, gold):
    return dsrl.reward(response, gold, "math")

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


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tok = dsrl.load_model_and_tokenizer(tiny_model_dir, "cpu")
    return model, tok


def run_cli(args, timeout=600, script="dsrl.py", threads=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, os.path.join(CODE, script)] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=CODE)


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


def test_group_advantages_without_std_is_reward_minus_group_mean():
    adv = dsrl.group_advantages(REWARDS, 4, use_std=False)
    expected = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -0.5, -0.5, 0.5, 0.5, 0, 0, 0, 0]
    assert adv.tolist() == expected, (f"A = {[round(a, 3) for a in adv.tolist()[:4]]} for rewards [1,0,0,0] without "
                                      "std, expected [0.75,-0.25,-0.25,-0.25]: in P(y) A = r - group mean, no std")


def test_group_advantages_with_unbiased_std():
    adv = dsrl.group_advantages(REWARDS, 4, use_std=True)
    # group 1: mean 0.25, unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)), (
        f"A = {adv[0].item():.3f} for rewards [1,0,0,0], expected 1.5: (r - mean) / (std + 1e-6), std unbiased")
    # group 3: std = sqrt(4 * 0.25 / 3)
    assert torch.allclose(adv[8:12], torch.tensor([-0.5, -0.5, 0.5, 0.5]) / (math.sqrt(1 / 3) + 1e-6)), (
        f"A = {adv[8:12].tolist()} for rewards [0,0,1,1], expected -/+0.866: the std is per group")
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
    assert not any(neg[4:8] + pos[4:8] + neg[12:] + pos[12:])


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
        "nsr-rl": ("y|x", "neg"), "psr-rl": ("y|x", "pos")}


def test_phase_record_holds_std_and_coefficient():
    """One record decides a step: P(y) phases never divide by std and are scaled by --prerl-coef."""
    warm, rl = dsrl.phase_for_step("dsrl", 5, 5, 0.03), dsrl.phase_for_step("dsrl", 6, 5, 0.03)
    assert (warm.use_std, warm.coef, warm.name) == (False, 0.03, "warmup"), "P(y): no std, coef = --prerl-coef"
    assert (rl.use_std, rl.coef, rl.name) == (True, 1.0, "rl"), "P(y|x): std, coef 1"
    assert dsrl.phase_for_step("nsr-prerl", 1, 0, 0.5)[:4] == ("y", "neg", False, 0.5)
    assert dsrl.phase_for_step("nsr-rl", 1, 0, 0.5)[:4] == ("y|x", "neg", True, 1.0)
    assert dsrl.phase_for_step("nsr-prerl", 1, 0).name == "rl"  # "warmup" only inside dsrl


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


def test_logprob_y_given_x_equals_models_own_cross_entropy(tiny):
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    pad = dsrl.pad_id(tok)
    logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, pad, temperature=1.0, chunk=5)
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
    assert (logp[~mask] == 0).all(), "padding positions must be 0"
    # and the same without padding at all, one row at a time (padding changes nothing)
    for i in range(3):
        single = torch.tensor([prompts[i] + responses[i]])
        with torch.no_grad():
            lg = model(input_ids=single).logits[0, len(prompts[i]) - 1:-1].log_softmax(-1)
        one = lg.gather(-1, torch.tensor(responses[i])[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :len(responses[i])], one, atol=1e-5)


def test_shared_prompt_forward_equals_separate_forwards(tiny):
    """Samples of one prompt share its forward (KV cache repeated): same log-probs and same gradients as one
    independent forward per sample, and as the model's own cross-entropy."""
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    prompts = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[1]]  # repeated, different lengths
    responses = [responses[0], responses[1], responses[2], responses[1], responses[0]]
    pad = dsrl.pad_id(tok)
    out = {}
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        logp, mask = dsrl.logprob_y_given_x(model, prompts, responses, pad, chunk=4, share_prompt=share)
        (logp * torch.arange(1.0, 6.0)[:, None]).sum().backward()  # a different weight per sample
        out[share] = logp.detach(), _grads(model)
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    for name, g in out[False][1].items():
        assert torch.allclose(out[True][1][name], g, atol=1e-5), name
    for i in range(5):  # one row at a time, no padding, the model's own logits
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([prompts[i] + responses[i]])).logits[0, len(prompts[i]) - 1:-1]
        ref = lg.log_softmax(-1).gather(-1, torch.tensor(responses[i])[:, None]).squeeze(-1)
        assert torch.allclose(out[True][0][i, :len(responses[i])], ref, atol=1e-5)


def test_logprob_y_equals_hand_built_start_token_forward(tiny):
    model, tok = tiny
    _, responses = _rollouts(tok)
    start = dsrl.token_id(tok, "<|im_start|>")
    assert start == tok.convert_tokens_to_ids("<|im_start|>")
    logp, mask = dsrl.logprob_y(model, start, responses, dsrl.pad_id(tok), temperature=1.0, chunk=3)
    for i, y in enumerate(responses):
        ids = torch.tensor([[start] + y])
        with torch.no_grad():
            lg = model(input_ids=ids, position_ids=torch.arange(len(y) + 1)[None]).logits[0, :-1].log_softmax(-1)
        ref = lg.gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
        assert torch.allclose(logp[i, :len(y)], ref, atol=1e-5), (
            "log P(y) differs from the forward of [<|im_start|>] + y at positions 0..|y|: the start token is "
            "start_id (<|im_start|>), and its state predicts y_0")
        assert int(mask[i].sum()) == len(y), "the mask marks the real response tokens"


def test_temperature_divides_logits(tiny):
    model, tok = tiny
    _, responses = _rollouts(tok)
    start = dsrl.token_id(tok, "<|im_start|>")
    y = responses[0]
    logp, _ = dsrl.logprob_y(model, start, [y], dsrl.pad_id(tok), temperature=0.5)
    with torch.no_grad():
        lg = (model(input_ids=torch.tensor([[start] + y])).logits[0, :-1] / 0.5).log_softmax(-1)
    assert torch.allclose(logp[0], lg.gather(-1, torch.tensor(y)[:, None]).squeeze(-1), atol=1e-5), (
        "log P(y) at temperature 0.5 must use logits / 0.5, as the sampler did")


def test_temperature_divides_logits_given_x(tiny):
    model, tok = tiny
    prompts, responses = _rollouts(tok)
    logp, _ = dsrl.logprob_y_given_x(model, prompts[:1], responses[:1], dsrl.pad_id(tok), temperature=0.5)
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([prompts[0] + responses[0]])).logits[0, len(prompts[0]) - 1:-1] / 0.5
    ref = lg.log_softmax(-1).gather(-1, torch.tensor(responses[0])[:, None]).squeeze(-1)
    assert torch.allclose(logp[0, :len(responses[0])], ref, atol=1e-5), (
        "log P(y|x) at temperature 0.5 must use logits / 0.5, as the sampler did")


def test_missing_start_token_is_a_clear_error():
    tok = make_tokenizer(specials=["<|endoftext|>", "<|im_end|>"])
    with pytest.raises(dsrl.UsageError, match="no <\\|im_start\\|> token"):
        dsrl.token_id(tok, "<|im_start|>")


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
    loss, active, denom = dsrl.policy_loss_backward(model, dsrl.Batch(prompts, responses, adv, keep), phase, args,
                                                    start, pad)
    return loss, len(active), sum(len(responses[i]) for i in active), denom


def _grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("space,samples", [("y", "neg"), ("y|x", "all"), ("y|x", "pos")])
def test_micro_batched_gradient_equals_one_batch(tiny, space, samples):
    model, tok = tiny
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


def test_token_mean_counts_only_kept_tokens(tiny):
    model, tok = tiny
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
def test_masked_samples_contribute_exactly_zero_gradient(tiny, space, samples, rewards):
    """Skipping masked / zero-advantage samples equals the full computation over every sample."""
    model, tok = tiny
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


def test_prerl_coefficient_scales_the_gradient(tiny):
    model, tok = tiny
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


def test_one_step_moves_parameters_and_nan_skips(tiny):
    model, tok = tiny
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
# 8. The reward: dev-file agreement, official superset, categories, adversarial inputs, time bound
# ----------------------------------------------------------------------------------------------------

CASES = read_jsonl(os.path.join(HERE, "testdata", "answer_cases_dev.jsonl"))  # copy of ../shared/data's file


def box(s):
    return 'Some reasoning.\n\nThe final answer is $\\boxed{%s}$.' % s


# ---------------------------------------------------------------- dev-file agreement
def test_dev_agreement():
    agree = 0
    for c in CASES:
        r = math_reward(c['response'], c['gold'])
        assert isinstance(r, float) and r in (0.0, 1.0)
        agree += (r == 1.0) == c['equal']
    assert agree / len(CASES) >= 0.95


def test_official_accept_implies_ours():
    for c in CASES:
        if official_reward(c['response'], c['gold']) == 1.0:
            assert math_reward(c['response'], c['gold']) == 1.0, c['id']
    for c in CASES:  # and the gold itself, boxed, is always right
        if c['gold'] and official_reward(box(c['gold']), c['gold']) == 1.0:
            assert math_reward(box(c['gold']), c['gold']) == 1.0


# ---------------------------------------------------------------- per-category units
CATEGORY_CASES = {
    'integer': [('42', '42', 1), ('42.0', '42', 1), ('-7', '7', 0), ('1,386', '1386', 1),
                ('1\\,386', '1386', 1), ('1{,}000{,}000', '1000000', 1), ('10^{6}', '1000000', 1),
                ('900,000', '9,000,000', 0), ('\\frac{1}{29,322,216}', '\\frac{1}{29322216}', 1)],
    'fraction': [('\\dfrac{3}{4}', '\\frac34', 1), ('3/4', '\\frac{3}{4}', 1), ('0.75', '\\frac34', 1),
                 ('\\frac{6}{8}', '\\frac34', 1), ('\\frac{3}{5}', '\\frac34', 0),
                 ('-\\frac{1}{2}', '\\frac{-1}{2}', 1), ('0.33', '\\frac13', 0),
                 ('\\frac94', '2\\frac{1}{4}', 1), ('3\\over 4', '\\frac34', 1)],
    'decimal': [('3.50', '3.5', 1), ('.5', '0.5', 1), ('3.49', '3.5', 0), ('1000.0', '1000', 1),
                ('3 \\times 10^{5}', '300000', 1), ('9.92\\times10^{-3}', '0.000992', 0)],
    'units/text': [('5\\text{ cm}^2', '5', 1), ('5 \\text{meters}', '5', 1), ('\\text{5 apples}', '5', 1),
                   ('\\$5.00', '5', 1), ('6\\text{ cm}', '5', 0), ('\\text{Sunday}', 'Sunday', 1),
                   ('\\text{Sunday}', '{Monday}', 0), ('125 miles', '125normal{miles}', 1),
                   ('LQXS', 'LQSX', 0), ('\\emptyset', '{empty}', 1)],
    'degrees': [('30^\\circ', '30', 1), ('30^{\\circ}', '30', 1), ('30\\text{ degrees}', '30', 1),
                ('60^\\circ', '30', 0)],
    'sqrt': [('2\\sqrt{2}', '\\sqrt8', 1), ('\\sqrt{8}', '2\\sqrt2', 1), ('1.414', '\\sqrt2', 0),
             ('\\frac{\\sqrt{2}}{2}', '\\frac{1}{\\sqrt2}', 1), ('\\sqrt[3]{8}', '2', 1),
             ('2^{1/2}', '\\sqrt2', 1), ('1.4142135623730951', '\\sqrt2', 0), ('\\sqrt3', '\\sqrt{3}', 1)],
    'pi': [('\\pi \\cdot 2', '2\\pi', 1), ('6.28', '2\\pi', 0), ('\\frac{\\pi}{3}', '\\frac13\\pi', 1),
           ('90^\\circ', '\\frac{\\pi}{2}', 0)],
    'expression': [('x^2+2x+1', '(x+1)^2', 1), ('2x+1', '1+2x', 1), ('x^2-1', '(x-1)(x+1)', 1),
                   ('x^2+1', '(x+1)^2', 0), ('\\frac{1}{x}', 'x^{-1}', 1),
                   ('\\sin^2 x + \\cos^2 x', '1', 1), ('\\frac{2}{\\cos x}', '2\\secx', 1),
                   ('2\\alpha', '\\alpha \\cdot 2', 1), ('2b', '2B', 0), ('3+4i', '4i+3', 1),
                   ('3-4i', '3+4i', 0), ('2^{99}', '2^{100}-2', 0)],
    'interval': [('[1, 2)', '[1,2)', 1), ('(1,2)', '[1,2]', 0), ('(-\\infty, 3]', '(-\\infty,3]', 1),
                 ('(-\\infty,3)', '(-\\infty,3]', 0), ('[2,3]\\cup[0,1]', '[0,1]\\cup[2,3]', 1),
                 ('\\left[0, \\frac12\\right)', '[0,0.5)', 1)],
    'tuple': [('(1, 2)', '(1,2)', 1), ('(2,1)', '(1,2)', 0), ('(\\frac12, 3)', '(0.5,3)', 1),
              ('(1,2);(3,4)', '(1,2);(3,4)', 1), ('{1,3}', '(3,1)', 0)],
    'set': [('\\{1,2\\}', '\\{2,1\\}', 1), ('1,2', '2,1', 1), ('1, 2, 3', '1,2', 0),
            ('\\{1,2\\}', '\\{1,3\\}', 0), ('\\pm 3', '3,-3', 1), ('3', '\\pm3', 0),
            ('A, B, E', '{A,B,E}', 1)],
    'matrix': [('\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{pmatrix}1&2\\3&4\\end{pmatrix}', 1),
               ('\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', 1),
               ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix}2\\\\1\\end{pmatrix}', 0),
               ('(1,2,3)', '\\begin{pmatrix}1\\\\2\\\\3\\end{pmatrix}', 1)],
    'equation': [('x=5', '5', 1), ('y = 2x+3', '2x+3', 1), ('x+y=1', 'y+x=1', 1),
                 ('2x+2y=2', 'x+y=1', 1), ('x+y=2', 'x+y=1', 0), ('x = 5', 'x=6', 0),
                 ('x \\geq 2', 'x\\ge2', 1), ('2 \\le x', 'x \\ge 2', 1), ('x>2', 'x\\ge2', 0)],
    'percent': [('50\\%', '50', 1), ('50%', '50', 1), ('50\\%', '0.5', 1), ('0.5', '50\\%', 1),
                ('5\\%', '50', 0), ('1.25\\%', '12.5', 0)],
    'mc': [('C', '(C)', 1), ('\\text{(C)}', 'C', 1), ('(C)', 'C', 1), ('\\textbf{(C)}', 'C', 1),
           ('D', 'C', 0), ('\\text{(D)}', '{(E)},', 0), ('(C) 12', 'C', 1)],
    'hedge': [('42 \\text{or} 43', '42', 0), ('42 \\; \\text{or} \\; 43', '42', 0), ('42, 43', '42', 0), ('42 or 43', '42', 0),
              ('\\text{maybe } 42', '42', 0), ('', '42', 0), ('5', '', 0)],
    'approx': [('\\approx 3.14', '3.14', 1), ('\\frac23', '\\frac{2}{3}\\approx0.67', 1),
               ('0.56', '0.56=56', 1)],
    'base': [('1011_2', '1011_2', 1), ('11', '1011_2', 0)],
}


@pytest.mark.parametrize('cat', sorted(CATEGORY_CASES))
def test_category(cat):
    for ans, gold, want in CATEGORY_CASES[cat]:
        got = math_reward(box(ans), gold)
        assert got == float(want), (cat, ans, gold, want)


def test_no_box_outcome():
    assert reward_outcome('I think it is 5.', '5') == (0.0, 'no_box')
    assert reward_outcome('The answer is \\boxed{\\frac{3}{4}', '\\frac34') == (0.0, 'no_box')


def test_nested_and_last_box():
    assert last_boxed('a \\boxed{3} b \\boxed{\\frac{1}{2}} c') == '\\frac{1}{2}'
    assert math_reward('\\boxed{\\boxed{5}}', '5') == 1.0
    assert math_reward('First \\boxed{3}, wait, actually \\boxed{5}.', '5') == 1.0
    assert math_reward('First \\boxed{5}, wait, actually \\boxed{3}.', '5') == 0.0
    assert last_boxed('\\boxed 7$') == '7' and last_boxed('nothing') is None


def test_fbox():
    assert last_boxed('so \\fbox{12}') == '12'
    assert math_reward('so \\fbox{12}.', '12') == 1.0


def test_strip_string_official_rules():
    assert strip_string('\\dfrac12') == '\\frac{1}{2}'
    assert strip_string('3/4') == '\\frac{3}{4}'
    assert strip_string('\\left( 3 \\right)') == '(3)'
    assert strip_string('90^\\circ') == '90'
    assert strip_string('\\$5') == '5' and strip_string('50\\%') == '50'
    assert strip_string('5\\text{ cm}') == '5'
    assert strip_string('.5') == '\\frac{1}{2}' and strip_string('0.5') == '\\frac{1}{2}'
    assert strip_string('x = 3') == '3' and strip_string('\\sqrt2') == '\\sqrt{2}'
    assert official_reward(box('\\tfrac{1}{2}'), '0.5') == 1.0
    assert official_reward(box('2x'), 'x2') == 0.0


# ---------------------------------------------------------------- adversarial and time bound
ADVERSARIAL = [
    (box('9^9^9^9'), '1'), (box('9^{9^{9^{9}}}'), '1'), (box('10^{10^{10^{10}}}-1'), '0'),
    (box('9' * 50000), '9'), (box('x' * 100000), 'x'), ('a' * 100000, '1'),
    ('\\boxed{' + '{' * 200 + '1' + '}' * 200 + '}', '2'), (box('(' * 200 + '1' + ')' * 200), '2'),
    ('\\boxed{' * 300 + '7' + '}' * 300, '8'), ('\\boxed{' * 300 + '7', '7'),
    ('}}}}{{{ \\boxed{{{{3}} and \\left( \\right', '3'), (box('\x00' * 500), '0'),
    (box("__import__('os').system('ls')"), '0'), (box("__import__('time').sleep(30)"), '0'),
    (box('42, 43'), '42'), (box('42 \\text{or } 43'), '42'), (box('\\frac{1}{0}'), '\\infty'),
    (box('(10^{100})!'), '1'), (box('\\sin(10^{1000})'), '0'), (box('x^{x^{x^{x^{x}}}}'), 'x'),
    (box('+'.join(['x'] * 3000)), '1'), (box('2^{-99999999}'), '0'),
    (box('\\begin{pmatrix}' + '\\\\'.join(['&'.join(['1'] * 60)] * 60) + '\\end{pmatrix}'), '1'),
    (box('\\sqrt{' * 100 + '2' + '}' * 100), '2'), (None, '1'), (box('1'), None),
    (box('42 or 43'), '42'), (box('42 \\text{ or } 43'), '42'), (box('maybe 42'), '42'),
]


@pytest.mark.parametrize('i', range(len(ADVERSARIAL)))
def test_adversarial_zero_and_fast(i):
    resp, gold = ADVERSARIAL[i]
    t = time.perf_counter()
    r = math_reward(resp, gold)
    assert time.perf_counter() - t < 1.0
    assert r == 0.0 and isinstance(r, float)


def test_time_bound_from_worker_thread():
    """The deadline is cooperative (no signals), so it also works off the main thread."""
    results = []

    def work():
        old = grader.TIME_BUDGET_S
        grader.TIME_BUDGET_S = 0.0  # force the deadline to expire on the first check
        try:
            results.append(reward_outcome(box('(x+1)^2'), 'x^2+2x+1'))
        finally:
            grader.TIME_BUDGET_S = old
        t = time.perf_counter()
        for resp, gold in ADVERSARIAL:
            results.append(reward_outcome(resp, gold))
        results.append(time.perf_counter() - t)

    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert not th.is_alive()
    assert results[0] == (0.0, 'timeout')
    assert all(r[0] == 0.0 for r in results[1:-1])
    assert results[-1] < len(ADVERSARIAL) * 1.0
    assert reward_outcome(box('(x+1)^2'), 'x^2+2x+1') == (1.0, 'right')


def test_never_raises_on_junk():
    for resp in ['\\boxed{\\frac}', '\\boxed{\\sqrt}', '\\boxed{^}', '\\boxed{\\begin{pmatrix}}',
                 '\\boxed{\\left(}', '\\boxed{1/}', '\\boxed{\\text{}}', '\\boxed{x/y}', 12, b'x']:
        r = reward_outcome(resp, '1')
        assert isinstance(r[0], float) and r[1] in ('right', 'wrong', 'no_box', 'unparseable', 'timeout')


def test_thread_safety_matches_serial():
    serial = [math_reward(c['response'], c['gold']) for c in CASES]
    out = {}

    def work(k):
        out[k] = [math_reward(c['response'], c['gold']) for c in CASES]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(out[k] == serial for k in range(6))


def test_hedges_are_wrong_even_where_the_official_scorer_accepts_them():
    hedge = "So it is $\\boxed{42 \\text{ or } 43}$."
    assert official_reward(hedge, "42") == 1.0  # the official rule cuts "\text{ or } 43" away as units
    assert reward_outcome(hedge, "42") == (0.0, "wrong")
    assert math_reward("$\\boxed{\\text{A or B}}$", "\\text{A or B}") == 1.0  # unless the gold says so itself
    assert math_reward("$\\boxed{x=2 \\text{ or } x=3}$", "2,3") == 1.0  # "or" joining ALL the roots is a list


def test_multiple_choice_letters():
    assert math_reward("$\\boxed{\\textbf{(E)}\\ 7}$", "\\textbf{(E)}") == 1.0  # letter then value, spaces gone
    assert math_reward("\\boxed{C}", "(C)") == 1.0 and math_reward("\\boxed{(B)}", "B") == 1.0
    assert math_reward("\\boxed{D}", "C") == 0.0
    assert math_reward("\\boxed{(A)+(B)}", "(A)") == 0.0 and math_reward("\\boxed{(A), (B)}", "A") == 0.0


def test_score_counts_outcomes_separately():
    texts = ["\\boxed{1}", "\\boxed{2}", "no box here", "\\boxed{" + "{" * 300 + "}", "\\boxed{\\frac{2}{4}}"]
    rewards, counts = dsrl.score(texts, ["1", "1", "1", "1", "0.5"])
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert counts["right"] == 2 and counts["no_box"] + counts["unparseable"] + counts["wrong"] == 3
    assert counts["no_box"] >= 1
    official, _ = dsrl.score(texts, ["1", "1", "1", "1", "0.5"], kind="official")
    assert official == [1.0, 0.0, 0.0, 0.0, 0.0]  # the official string scorer: \frac{2}{4} != 0.5 as strings


# ---------------------------------------------------------------- grader.py: the checker on its own
GRADER_PY = os.path.join(HERE, 'grader.py')
DEV_CASES = read_jsonl(os.path.join(HERE, 'testdata', 'answer_cases_dev.jsonl'))
# (reward, outcome) of every dev case, frozen from dsrl.reward_outcome before the checker moved here
DEV_OUTCOMES = {row['id']: (row['reward'], row['outcome'])
                for row in read_jsonl(os.path.join(HERE, 'testdata', 'answer_outcomes_dev.jsonl'))}


def reward(response, gold):
    """What training computes (dsrl.reward), checked equal to its spelled-out composition."""
    composed = grader.grade(last_boxed(response), gold, official_equal=official_reward(response, gold) == 1.0)
    assert dsrl.reward(response, gold) == composed
    return composed


def run_grader(*args):
    return subprocess.run([sys.executable, GRADER_PY, *args], capture_output=True, text=True, timeout=60)


def test_dev_cases_keep_their_frozen_outcomes():
    assert set(DEV_OUTCOMES) == {c['id'] for c in DEV_CASES}
    for c in DEV_CASES:
        assert reward(c['response'], c['gold']) == DEV_OUTCOMES[c['id']], c['id']


def test_command_line_box_agrees_with_dsrl_last_boxed():
    texts = [c['response'] for c in DEV_CASES] + [
        'a \\boxed{3} b \\boxed{\\frac{1}{2}} c', '\\boxed{\\boxed{5}}', '\\boxed 7$', 'so \\fbox{12}.',
        'The answer is \\boxed{\\frac{3}{4}', '\\boxed{1} and \\boxed{', '\\boxed {2}', '\\boxedx{2}', 'nothing',
        '\\boxed', '\\boxed 3 \\boxed{2}', '\\boxed{' * 300 + '7' + '}' * 300, None, 12]
    for text in texts:
        assert grader._last_box(text) == last_boxed(text), text


def test_grade_outcomes_and_never_raises():
    assert grader.OUTCOMES == ('right', 'wrong', 'no_box', 'unparseable', 'timeout')
    assert grader.grade('\\frac{2}{4}', '0.5') == (1.0, 'right')
    assert grader.grade('3', '4') == (0.0, 'wrong')
    assert grader.grade(None, '4') == (0.0, 'no_box')
    assert grader.grade(None, '4', official_equal=True) == (1.0, 'right')  # the official verdict comes first
    assert grader.grade('42 \\text{ or } 43', '42', official_equal=True) == (0.0, 'wrong')  # except for a hedge
    assert grader.grade('1' * 2000, '1') == (0.0, 'unparseable')
    for answer, gold in [('\\frac', '1'), ('1', None), (5, '5'), ('\\frac{1}{0}', '1'), ('9^{9^{9^9}}', '1')]:
        r, outcome = grader.grade(answer, gold)
        assert r == 0.0 and outcome in grader.OUTCOMES


def test_deadline_gives_timeout_in_a_worker_thread(monkeypatch):
    monkeypatch.setattr(grader, 'TIME_BUDGET_S', 0.0)  # the deadline expires at the first check
    results = []
    worker = threading.Thread(target=lambda: results.append(grader.grade('(x+1)^2', 'x^2+2x+1')))
    worker.start()
    worker.join(30)
    assert results == [(0.0, 'timeout')]
    monkeypatch.setattr(grader, 'TIME_BUDGET_S', 0.5)
    assert grader.grade('(x+1)^2', 'x^2+2x+1') == (1.0, 'right')


def test_cli_right_wrong_and_no_box():
    right = run_grader('so $\\boxed{\\frac{2}{4}}$.', '0.5')
    assert right.returncode == 0 and right.stderr == ''
    lines = right.stdout.splitlines()
    assert lines[0] == 'answer: \\frac{2}{4}' and lines[1] == 'gold: 0.5'
    assert lines[2] == 'cleaned answer: \\frac{2}{4}' and lines[3] == 'cleaned gold: 0.5'
    assert lines[4:] == ['verdict: equal', 'outcome: right']
    wrong = run_grader('x = 3', '4')  # no box: the whole text is the answer
    assert wrong.returncode == 0
    assert 'answer: x = 3' in wrong.stdout and wrong.stdout.endswith('verdict: not equal\noutcome: wrong\n')
    cut = run_grader('The answer is \\boxed{\\frac{3}{4}', '\\frac34')
    assert cut.returncode == 0 and cut.stdout.endswith('verdict: not equal\noutcome: no_box\n')


def test_cli_bad_usage_exits_2_without_traceback():
    for args in [(), ('only one',), ('a', 'b', 'c')]:
        res = run_grader(*args)
        assert res.returncode == 2 and res.stdout == ''
        assert len(res.stderr.strip().splitlines()) == 1 and 'usage' in res.stderr
        assert 'Traceback' not in res.stderr
    helped = run_grader('--help')
    assert helped.returncode == 0 and 'dsrl.official_reward' in helped.stdout


def test_grader_does_not_import_dsrl():
    tree = ast.parse(open(GRADER_PY).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name.split('.')[0] != 'dsrl' for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or '').split('.')[0] != 'dsrl'


def test_grader_functions_are_short():
    tree = ast.parse(open(GRADER_PY).read())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 40]
    assert long == []


def test_one_public_function_besides_main():
    public = {name for name, value in vars(grader).items()
              if callable(value) and not name.startswith('_') and getattr(value, '__module__', None) == 'grader'}
    assert public == {'grade', 'main'}


NEW_CASES = read_jsonl(os.path.join(HERE, 'testdata', 'answer_cases_new.jsonl'))
DEV_CASES = read_jsonl(os.path.join(HERE, 'testdata', 'answer_cases_dev.jsonl'))
DEV_OUTCOMES = {r['id']: (r['reward'], r['outcome']) for r in read_jsonl(os.path.join(HERE, 'testdata', 'answer_outcomes_dev.jsonl'))}


# ---------------------------------------------------------------- new labelled cases: the reward's former misses
def test_new_cases_file_covers_each_kind_with_right_and_wrong_cases():
    assert [c['id'] for c in NEW_CASES] == ['n%04d' % (k + 1) for k in range(len(NEW_CASES))]
    for kind in ('empty_gold', 'left_right_dot', 'array_matrix', 'digit_groups', 'inequality_union', 'all_reals'):
        cases = [c for c in NEW_CASES if c['category'] == kind]
        assert len(cases) >= 8 and {c['equal'] for c in cases} == {True, False}, kind
        assert all(set(c) == {'id', 'response', 'gold', 'equal', 'category'} for c in cases)


def test_new_cases_agreement_no_timeouts_no_crashes():
    agree, slowest = 0, 0.0
    for c in NEW_CASES:
        t = time.perf_counter()
        r, outcome = dsrl.reward(c['response'], c['gold'])
        slowest = max(slowest, time.perf_counter() - t)
        assert outcome in grader.OUTCOMES and outcome not in ('timeout', 'unparseable'), c['id']
        agree += (r == 1.0) == c['equal']
    assert agree / len(NEW_CASES) >= 0.95
    assert slowest < 1.0


def test_dev_and_new_agreement_together():
    cases = DEV_CASES + NEW_CASES
    agree = sum((dsrl.math_reward(c['response'], c['gold']) == 1.0) == c['equal'] for c in cases)
    assert agree / len(cases) >= 0.95


def test_dev_outcomes_still_frozen():
    assert set(DEV_OUTCOMES) == {c['id'] for c in DEV_CASES}
    for c in DEV_CASES:
        assert dsrl.reward(c['response'], c['gold']) == DEV_OUTCOMES[c['id']], c['id']


# ---------------------------------------------------------------- rule 1: an empty gold is never matched
def test_empty_gold_is_never_matched():
    for answer in (None, '', '  ', '5', '\\emptyset'):
        for official in (False, True):
            assert grader.grade(answer, '', official_equal=official)[0] == 0.0, (answer, official)
    assert grader.grade(None, '') == (0.0, 'no_box')
    assert grader.grade('', '') == (0.0, 'wrong') and grader.grade('  ', '') == (0.0, 'wrong')
    assert grader.grade('', ' $ $ \\, ', official_equal=True) == (0.0, 'wrong')  # blank in any spelling
    assert dsrl.official_reward(box(''), '') == 1.0  # the official string scorer matches '' with ''
    assert dsrl.reward(box(''), '') == (0.0, 'wrong')  # ... but the reward does not
    assert dsrl.reward(box('5'), '') == (0.0, 'wrong')
    assert dsrl.reward(box('\\emptyset'), '\\emptyset') == (1.0, 'right')  # the empty SET is an answer


# ---------------------------------------------------------------- rule 2: \left. ... \right. (invisible delimiters)
def test_invisible_left_right_delimiters_are_dropped():
    assert dsrl.reward(box('\\left. \\frac{3}{4} \\right.'), '\\frac34') == (1.0, 'right')
    assert dsrl.math_reward(box('\\left. 2\\sqrt{3} \\right.'), '\\sqrt{12}') == 1.0
    assert dsrl.math_reward(box('\\left. \\frac{1}{2} \\right|'), '0.5') == 1.0  # evaluation bar
    assert dsrl.math_reward(box('\\left| \\frac{1}{2} \\right.'), '0.5') == 1.0
    assert grader.grade('\\left\\{ 1, 2 \\right.', '\\{1,2\\}') == (1.0, 'right')  # (boxed, dsrl.last_boxed
    # counts "\\{" as a brace, finds the box unbalanced and gives no_box: so this form is checked on the grader alone)
    assert dsrl.math_reward(box('\\left. (1,2] \\right.'), '[1,2]') == 0.0
    assert dsrl.math_reward(box('\\left. 7 \\right.'), '8') == 0.0
    assert dsrl.math_reward(box('\\left| -3 \\right|'), '3') == 1.0  # a visible pair is kept: |-3|
    assert dsrl.math_reward(box('\\left| -3 \\right|'), '-3') == 0.0


# ---------------------------------------------------------------- rule 3: array matrices in brackets
def test_array_matrix_in_brackets_equals_pmatrix():
    pmatrix = '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}'
    for answer in ('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]',
                   '\\left(\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right)',
                   '\\left[\\begin{array} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]',  # no column spec
                   '\\left[\\begin{array}{c|c} 1 & 2 \\\\ \\hline 3 & 4 \\end{array}\\right]',
                   '\\left[ \\begin{matrix} 1 & 2 \\\\ 3 & 4 \\end{matrix} \\right]',
                   '\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}'):
        assert dsrl.reward(box(answer), pmatrix) == (1.0, 'right'), answer
    assert dsrl.math_reward(box('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]'),
                            '\\begin{pmatrix}1&2\\3&4\\end{pmatrix}') == 1.0  # a normalised MATH gold
    assert dsrl.math_reward(box('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 5 \\end{array}\\right]'), pmatrix) == 0.0
    assert dsrl.math_reward(box('\\left|\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right|'), pmatrix) == 0.0
    # shapes must agree: the same four entries as 1x4 or 2x2 are different matrices
    assert dsrl.math_reward(box('\\begin{pmatrix} 1 & 2 & 3 & 4 \\end{pmatrix}'), pmatrix) == 0.0
    assert dsrl.math_reward(box('\\begin{pmatrix} 1 & 2 \\end{pmatrix}'),
                            '\\begin{pmatrix}1\\\\2\\end{pmatrix}') == 1.0  # vectors: row = column


# ---------------------------------------------------------------- rule 4: digit groups
def test_digit_groups_are_one_number():
    for answer in ('1,\\!234,\\!567', '1\\,234\\,567', '1{,}234{,}567', '1,\\! 234,\\! 567', '1 234 567',
                   '1\\ 234\\ 567', '1,234,567'):
        assert dsrl.reward(box(answer), '1234567') == (1.0, 'right'), answer
    assert dsrl.math_reward(box('1{,}234'), '1234') == 1.0
    assert dsrl.math_reward(box('(1,\\!234, 5)'), '(1234, 5)') == 1.0  # also inside a tuple
    assert dsrl.math_reward(box('1 234'), '234') == 0.0  # a space between groups is no product
    assert dsrl.math_reward(box('1,\\!234,\\!576'), '1234567') == 0.0
    assert dsrl.math_reward(box('1,\\! 23'), '123') == 0.0  # not a group of three
    assert dsrl.math_reward(box('1,\\!000'), '1') == 0.0


# ---------------------------------------------------------------- rule 5: "or" between inequalities is a union
def test_inequalities_joined_by_or_are_a_union():
    union = '(-\\infty,2]\\cup(5,\\infty)'
    for answer in ('x \\le 2 \\text{ or } x > 5', 'x \\leq 2 or x > 5', 'x > 5 \\text{ or } x \\le 2',
                   'x \\le 2 \\quad\\text{or}\\quad x > 5', 'x \\le 2 \\cup x > 5', '2 \\ge x \\text{ or } 5 < x'):
        assert dsrl.reward(box(answer), union) == (1.0, 'right'), answer
    assert dsrl.math_reward(box(union), 'x \\le 2 \\text{ or } x > 5') == 1.0  # the gold may be the inequalities
    assert dsrl.math_reward(box('x \\le 2 \\text{ or } x \\ge 5'), union) == 0.0  # endpoint
    assert dsrl.math_reward(box('x \\le 2 \\text{ or } y > 5'), union) == 0.0  # two variables
    assert dsrl.math_reward(box('x < 1 \\text{ or } x = 3'), '(-\\infty,1)\\cup\\{3\\}') == 1.0
    assert dsrl.math_reward(box('x \\le 2,\\ \\text{or}\\ x > 5'), union) == 1.0  # comma before "or"
    assert dsrl.math_reward(box('x \\le 2 \\textrm{or} x > 5'), union) == 1.0
    assert dsrl.math_reward(box('1, 2, \\text{or } 3'), '1, 2, 3') == 1.0  # Oxford comma in a list of roots
    # "or" between numbers (or equations alone) stays a hedge: wrong against one value and against the union
    assert dsrl.reward(box('2 \\text{ or } 5'), '2') == (0.0, 'wrong')
    assert dsrl.math_reward(box('2 \\text{ or } 5'), union) == 0.0
    assert dsrl.math_reward(box('x = 2 \\text{ or } x = 5'), '2') == 0.0
    assert dsrl.math_reward(box('x = 2 \\text{ or } x = 5'), '2, 5') == 1.0


# ---------------------------------------------------------------- rule 6: all real numbers
def test_all_reals():
    everything = '(-\\infty,\\infty)'
    for answer in ('\\mathbb{R}', '\\mathbb R', '\\R', '\\text{all real numbers}', '\\text{All real numbers}',
                   'x \\in \\mathbb{R}', '\\text{all real } x', '(-\\infty, +\\infty)', '-\\infty < x < \\infty'):
        assert dsrl.reward(box(answer), everything) == (1.0, 'right'), answer
    assert dsrl.math_reward(box(everything), '\\mathbb{R}') == 1.0
    for answer in ('\\mathbb{R}^+', '\\mathbb{R}^2', '\\mathbb{Z}', '[0,\\infty)', '\\mathbb{R} \\setminus \\{0\\}',
                   '\\text{all real numbers except } 2'):
        assert dsrl.math_reward(box(answer), everything) == 0.0, answer


# ---------------------------------------------------------------- the new rules stay fast on hostile input
HOSTILE = [
    '1' + ' ' * 990 + '234', '1 ' * 495, '1,\\!' * 240, '123 ' * 249, '\\left.' * 160,
    '\\left(' * 160 + '\\right.' * 100, '\\right|' * 140, 'x<1 \\text{ or } ' * 60 + 'x>2', 'x<1 or ' * 140,
    '\\mathbb' + ' ' * 900 + 'R', 'all' + ' ' * 900 + 'real', '[' * 400 + '\\begin{array}' + ']' * 400,
    '(\\begin{array}' * 70 + ')' * 70, '1{,} ' * 190 + '123', '\\left[\\begin{array}{' + 'c' * 900 + '}',
]


@pytest.mark.parametrize('i', range(len(HOSTILE)))
def test_hostile_inputs_for_the_new_rules_are_fast(i):
    for gold in ('7', '(-\\infty,\\infty)', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}'):
        t = time.perf_counter()
        r, outcome = dsrl.reward(box(HOSTILE[i]), gold)
        assert time.perf_counter() - t < 1.0
        assert outcome in grader.OUTCOMES and (r == 0.0 or gold != '7')  # "\\mathbb   R" is all reals


# ---------------------------------------------------------------- maj@k by equivalence (eval.py)
def test_majority_groups_equivalent_answers():
    answers = ['0.5', '\\frac{1}{2}', '1/2', '3', '3']
    assert evaluator.majority_correct(answers, [1.0, 1.0, 1.0, 0.0, 0.0]) == 1.0  # the 1/2 class: 3 votes
    assert evaluator.answer_classes(answers) == [[0, 3], [3, 2]]
    assert evaluator.majority_correct(['3', '3', '0.5', '\\frac{1}{2}', '1/2'], [0.0, 0.0, 1.0, 1.0, 1.0]) == 1.0
    # the reward of the class is its representative's (the first member's)
    assert evaluator.majority_correct(['2/4', '0.5', '7'], [0.0, 1.0, 0.0]) == 0.0
    # from whole responses, through extracted_answer as evaluate_benchmark does
    texts = [box(a) for a in ('0.50', '\\dfrac{2}{4}', '3', '1/2', '3')]
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


def test_accuracy_metrics_majority_by_equivalence():
    rewards = [[1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]
    answers = [['0.5', '\\frac{1}{2}', '3', '3', '1/2'], [None, '3', '4', '4', '3']]
    m = evaluator.accuracy_metrics(rewards, answers, [[10] * 5] * 2, [[False] * 5] * 2, k=5)
    assert m['maj@5'] == 0.5  # problem 0: the 1/2 class (3 votes) is right; problem 1: '3' (earliest of a tie) wrong


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
def test_cli_runs_every_mode(tiny_model_dir, tiny_data, tmp_path, mode):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    res = run_cli(cli_args(tiny_model_dir, tiny_data, out, mode=mode))
    assert res.returncode == 0, res.stderr[-3000:]
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
    for s in samples:
        assert s["reward"] == math_reward(s["response"], s["gold"])
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


def test_cli_on_the_official_math_train_file(tiny_model_dir, tmp_path):
    """Extra check on ../shared/data/math_train.parquet (only present in the developers' checkout)."""
    path = os.path.join(SHARED_DATA, "math_train.parquet")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (it is not shipped with the repo); the tiny verl-format fixture covers the format")
    out = tmp_path / "run"
    res = run_cli(cli_args(tiny_model_dir, path, out, steps=1, **{"max-new-tokens": 8, "warmup-steps": 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    # 4 of the 7,500 official rows have an empty ground truth: skipped and counted, not trained on
    assert (config["n_examples"], config["n_malformed_rows"]) == (7496, 4)
    assert len(read_jsonl(out / "samples.jsonl")) == 16


@pytest.fixture(scope="module")
def dsrl_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """One real DSRL run through the CLI: 3 warm-up steps in P(y), then 2 GRPO steps."""
    out = tmp_path_factory.mktemp("wiring") / "run"
    res = run_cli(cli_args(tiny_model_dir, tiny_data, out, steps=5, **{"warmup-steps": 3, "prompts-per-step": 8,
                                                                         "save-every": 5}))
    assert res.returncode == 0, res.stderr[-3000:]
    samples = read_jsonl(out / "samples.jsonl")
    groups = {}  # (step, group) -> its 4 samples, in the logged (prompt-major) order
    for i, s in enumerate(samples):
        groups.setdefault((s["step"], (i % 32) // 4), []).append(s)
    return read_jsonl(out / "metrics.jsonl"), samples, groups


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


def test_build_prompt_renders_the_chat_template_exactly():
    tok = make_tokenizer()
    messages = [{"role": "system", "content": dsrl.SYSTEM_PROMPT}, {"role": "user", "content": "What is 1+1?"}]
    want = ("<|im_start|>system\n" + dsrl.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # add_generation_prompt, enable_thinking=False
    ids = dsrl.build_prompt(tok, messages, 10 ** 6)
    assert tok.decode(ids) == want
    assert dsrl.build_prompt(tok, messages, 10) == ids[-10:]  # left truncation keeps the end


def test_sampling_overrides_the_models_generation_config(tiny):
    """temperature/top_p as given, top_k and min_p off, no repetition penalty, whatever generation_config says."""
    model, tok = tiny
    prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
    draws = []
    for config in ({}, {"temperature": 0.05, "top_k": 1, "top_p": 0.1, "min_p": 0.9, "repetition_penalty": 10.0}):
        for key, value in config.items():
            setattr(model.generation_config, key, value)
        torch.manual_seed(3)
        draws.append(dsrl.sample_responses(model, tok, prompts, 4, 16, temperature=1.0, top_p=1.0))
    assert draws[0] == draws[1]
    assert len({tuple(r) for r in draws[0][0]}) > 1  # really sampled at temperature 1


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


def test_sampler_computes_logits_for_the_last_prompt_position_only(tiny):
    """The prompt forward builds the KV cache without the vocabulary projection (151,936 logits per position)."""
    model, tok = tiny
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    try:
        prompts = [dsrl.build_prompt(tok, r["prompt"], 512) for r in problem_rows(2)]
        for share in (True, False):
            dsrl.sample_responses(model, tok, prompts, 4, 5, share_prompt=share)
    finally:
        hook.remove()
    assert seen and all(shape[1] == 1 for shape in seen), seen[:3]


def test_unknown_flag_is_an_error(tmp_path):
    res = run_cli(["--no-such-flag", "1"])
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr


# ----------------------------------------------------------------------------------------------------
# Reliability: exact resume after SIGKILL, SIGTERM, atomic checkpoints, clear errors, no silent NaN
# ----------------------------------------------------------------------------------------------------
def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _run_until(args, condition, timeout=300):
    """Start the CLI (2 threads), SIGKILL it as soon as condition() holds. Returns True if the kill landed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "dsrl.py")] + [str(a) for a in args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=HERE)
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


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tiny_model_dir, tiny_data, tmp_path):
    from safetensors.torch import load_file
    flags = dict(steps=4, **{"save-every": 1, "save-total-limit": 0, "warmup-steps": 2})
    ref = tmp_path / "ref"
    assert run_cli(cli_args(tiny_model_dir, tiny_data, ref, **flags)).returncode == 0
    for broken in ("trainer_state.pt", "model.safetensors"):
        out = tmp_path / broken
        shutil.copytree(ref, out)
        for step in (3, 4):
            _corrupt(out / f"checkpoint-{step}" / broken)
        res = run_cli(["--output-dir", out, "--resume"])
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 2 and "checkpoint-4" in warnings[0] and "checkpoint-3" in warnings[1]
        assert "resumed from" in res.stderr and "checkpoint-2 at step 2" in res.stderr
        assert _strip_timing(read_jsonl(out / "metrics.jsonl")) == _strip_timing(read_jsonl(ref / "metrics.jsonl"))
        weights, want = load_file(out / "checkpoint-4" / "model.safetensors"), load_file(ref / "checkpoint-4" / "model.safetensors")
        assert all(torch.equal(weights[k], want[k]) for k in want)
    out = tmp_path / "none readable"
    shutil.copytree(ref, out)
    for step in (1, 2, 3, 4):
        _corrupt(out / f"checkpoint-{step}" / "trainer_state.pt")
    res = run_cli(["--output-dir", out, "--resume"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --resume: no readable checkpoint")


def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_model_dir, tiny_data, tmp_path):
    import signal
    out = tmp_path / "run"
    args = cli_args(tiny_model_dir, tiny_data, out, steps=40, **{"save-every": 100})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "dsrl.py")] + [str(a) for a in args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE)
    while _n_lines(out / "metrics.jsonl") < 1 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    last = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert last < 40 and os.path.exists(out / f"checkpoint-{last}" / "trainer_state.pt")
    res = run_cli(["--output-dir", out, "--resume", "--steps", last + 2])  # --steps may grow on resume
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, last + 3))


def test_resume_refuses_settings_that_change_the_run(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(cli_args(tiny_model_dir, tiny_data, out, steps=1, **{"warmup-steps": 1})).returncode == 0
    res = run_cli(["--output-dir", out, "--resume", "--group-size", 8, "--lr", 0.5])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --resume: group_size, lr differ")


def test_failed_checkpoint_write_keeps_the_previous_one(tiny, tmp_path, monkeypatch):
    model, tok = tiny
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


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def nan_loss(model, *a, **k):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        return float("nan"), [0], 1
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


BAD_INPUTS = {  # name -> (flags, fragment of the one-line error)
    "missing model": (["--model", "/no/such/model"], "model path not found"),
    "missing dataset": (["--dataset", "/no/such/file.parquet"], "dataset file not found"),
    "group size 1": (["--group-size", "1"], "--group-size 1: needs >= 2"),
    "warmup > steps": (["--steps", "3", "--warmup-steps", "5"], "--warmup-steps 5: must be between 0 and --steps 3"),
    "negative warmup": (["--mode", "grpo", "--warmup-steps=-1"], "--warmup-steps -1: must be between 0"),
    "negative lr": (["--lr=-1e-6"], "--lr -1e-06: must be > 0"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_flags_give_one_line_and_exit_2(tiny_model_dir, tiny_data, tmp_path, name, capsys):
    flags, fragment = BAD_INPUTS[name]
    base = ["--model", tiny_model_dir, "--dataset", tiny_data, "--output-dir", str(tmp_path / "o")]
    assert dsrl.main(base + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


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


def test_bad_files_give_one_line_and_exit_2(tiny_model_dir, tiny_data, tmp_path, capsys):
    cases = _bad_files(tmp_path, tiny_model_dir)
    for name, (flags, fragment) in cases.items():
        base = ["--model", tiny_model_dir, "--dataset", tiny_data, "--output-dir", str(tmp_path / "o" / name)]
        assert dsrl.main(base + [str(f) for f in flags]) == 2, name
        err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("warning")]
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (name, err)


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    res = run_cli(["--model", "/no/such/model", "--output-dir", tmp_path / "o",
                   "--dataset", tmp_path / "missing.jsonl"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: dataset file not found: {tmp_path / 'missing.jsonl'} "
                                               "(give an existing .parquet/.jsonl file or a hub id)"]


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\nnot json\n'
                    '{"problem": "3+3", "solution": "so \\\\boxed{6}."}\n')
    examples, n_bad = dsrl.load_problems(str(path))
    assert n_bad == 2 and [e["answer"] for e in examples] == ["2", "6"]
    assert examples[0]["messages"][0] == {"role": "system", "content": dsrl.SYSTEM_PROMPT}


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
    assert evaluator.pass_at_k(4, 1, 4) == 1.0  # k = n: any right sample counts
    assert evaluator.pass_at_k(4, 0, 4) == 0.0  # c = 0
    assert evaluator.pass_at_k(4, 4, 1) == 1.0
    assert evaluator.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    for n, c, k in [(20, 3, 4), (32, 5, 16), (32, 31, 2)]:  # the stable product equals the binomial form
        assert evaluator.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k)), (
            f"pass@{k} with {c} right of {n}: unbiased estimator 1 - C(n-c, k) / C(n, k)")


def test_k_values():
    assert evaluator.k_values(1) == [1]
    assert evaluator.k_values(32) == [1, 2, 4, 8, 16, 32]
    assert evaluator.k_values(20) == [1, 2, 4, 8, 16, 20]


def test_majority_vote_tie_goes_to_earliest_answer():
    assert evaluator.majority_correct(["3", "5", "5", "3"], [0.0, 1.0, 1.0, 0.0]) == 0.0  # 2-2 tie: "3" came first
    assert evaluator.majority_correct(["5", "3", "3", "5"], [1.0, 0.0, 0.0, 1.0]) == 1.0
    assert evaluator.majority_correct([None, None, "7", "2", "2"], [0.0, 0.0, 1.0, 0.0, 0.0]) == 0.0  # no-box does not vote
    assert evaluator.majority_correct([None, None], [0.0, 0.0]) == 0.0


def test_accuracy_metrics_hand_values():
    rewards = [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # problem 0: c=1 of 4; problem 1: c=0
    answers = [["2", "1", "1", None], [None, "3", "4", "4"]]
    m = evaluator.accuracy_metrics(rewards, answers, [[10, 20, 30, 40]] * 2, [[False] * 3 + [True]] * 2, k=4)
    assert m["avg@4"] == pytest.approx(1 / 8)
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx((0.125, 0.25, 0.5))
    assert m["maj@4"] == 0.0 and m["n_problems"] == 2 and m["n_samples"] == 8
    assert m["response_len_mean"] == 25 and m["truncated_frac"] == 0.25


def test_extracted_answer_is_normalised():
    assert evaluator.extracted_answer("so \\boxed{\\dfrac{1}{2}}") == evaluator.extracted_answer("\\boxed{\\frac{1} {2}}")
    assert evaluator.extracted_answer("no box") is None
    assert evaluator.gold_text(27.0) == "27" and evaluator.gold_text(2.5) == "2.5" and evaluator.gold_text(" 7 ") == "7"


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


def test_evaluate_accuracy_as_the_trainer_calls_it(tiny, tmp_path):
    model, tok = tiny
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
    logits = model(input_ids=torch.tensor([context + response])).logits[0, len(context) - 1:-1]  # (T, V)
    (-F.cross_entropy(logits, torch.tensor(response), reduction="sum")).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def test_alignment_equals_independent_gradients(tiny):
    model, tok = tiny
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


def test_cosine_of_a_gradient_with_itself_is_one(tiny):
    model, tok = tiny
    prompt = dsrl.build_prompt(tok, problem_rows(1)[0]["prompt"], 512)
    response = tok("\\boxed{1}<|im_end|>", add_special_tokens=False)["input_ids"]
    buf = torch.zeros(sum(p.numel() for p in model.parameters()))
    for into in (True, False):
        logp, mask = dsrl.logprob_y_given_x(model, [prompt], [response], dsrl.pad_id(tok))
        logp[mask].sum().backward()
        if into:
            evaluator.flat_grad_into(model, buf)
        else:
            dot, sq = evaluator.grad_dot(model, buf)
    assert dot / (buf.norm().item() * math.sqrt(sq)) == pytest.approx(1.0, abs=1e-5)


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
    assert all(x["reward"] == dsrl.reward(x["response"], x["gold"])[0] for x in rows)  # the trainer's own reward


def test_cli_behaviours(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"step": s, "prompt_index": 0, "response": RESPONSE, "gold": "4",
                                           "reward": float(s == 1), "advantage": 0.0, "used_in_loss": True}) + "\n"
                               for s in (1, 2)))
    r = run_cli(["behaviours", "--samples", samples, "--output", tmp_path / "beh"], script="eval.py")
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "beh" / "behaviours.json"))
    assert s["all"]["reflection"] == 3 and s["correct"]["n_responses"] == 1 and len(s["per_step"]) == 2
    assert "| all | 2 |" in r.stdout and "| group |" in r.stdout and (tmp_path / "beh" / "behaviours.md").read_text().strip() == r.stdout.strip()


def test_cli_align(tiny_model_dir, tmp_path):
    bench = repeated_benchmark(str(tmp_path / "rep.parquet"))
    r = run_cli(["align", "--model", tiny_model_dir, "--benchmark", bench, "--rollouts", 4, "--max-new-tokens", 12,
                 "--device", "cpu", "--output", tmp_path / "al"], script="eval.py")
    assert r.returncode == 0, r.stderr
    s = json.load(open(tmp_path / "al" / "align.json"))
    rows = read_jsonl(str(tmp_path / "al" / "align_rollouts.jsonl"))
    assert s["rollouts"] == len(rows) == 4 and sorted({x["problem_index"] for x in rows}) == [0, 1, 2]
    assert all(-1 <= x["cosine"] <= 1 and x["norm_x"] > 0 for x in rows)
    assert s["negative_frac"] == sum(x["inner"] < 0 for x in rows) / 4 and s["tokens"] == sum(x["length"] for x in rows)


def write_run(run_dir, phases):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as fh:
        for step, phase in enumerate(phases, 1):
            fh.write(json.dumps({"step": step, "phase": phase, "reward_mean": step / 10, "solved_all": 1, "solved_none": 0,
                                 "response_len_mean": 10.0 + step, "loss": 0.1, "grad_norm": 0.5,
                                 "eval/amc23/avg@4": 0.2}) + "\n")
    with open(os.path.join(run_dir, "samples.jsonl"), "w") as fh:
        for step in range(1, len(phases) + 1):
            fh.write(json.dumps({"step": step, "response": RESPONSE, "reward": 1.0}) + "\n")


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(str(tmp_path / "dsrl"), ["warmup", "warmup", "rl", "rl"])
    write_run(str(tmp_path / "grpo"), ["rl"] * 4)
    assert evaluator.handover_step(read_jsonl(str(tmp_path / "dsrl" / "metrics.jsonl"))) == 3
    with open(tmp_path / "grpo" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "rew')  # a run still writing: the torn last line is skipped
    r = run_cli(["plot", tmp_path / "dsrl", tmp_path / "grpo", "--out", tmp_path / "plots"], script="eval.py")
    assert r.returncode == 0, r.stderr
    for name in ("reward", "solved", "response_length", "loss", "eval", "behaviours"):
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


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    write_run(str(tmp_path / "run"), ["rl"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert evaluator.main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "p")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_cli_bad_input_is_one_line(tmp_path):
    r = run_cli(["behaviours", "--samples", tmp_path / "missing.jsonl"], script="eval.py")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_cli(["accuracy", "--model", "x", "--k", 0], script="eval.py")
    assert r.returncode == 2 and "--k" in r.stderr and "Traceback" not in r.stderr


def test_eval_every_writes_eval_metrics_into_the_run(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    res = run_cli(cli_args(tiny_model_dir, tiny_data, out, steps=2, **{"warmup-steps": 1, "eval-every": 2,
                                                                       "eval-benchmarks": tiny_data, "eval-k": 2}))
    assert res.returncode == 0, res.stderr[-2000:]
    m0, m1, m2 = read_jsonl(out / "metrics.jsonl")
    assert m0["step"] == 0 and set(m0) == {"step"} | {k for k in m2 if k.startswith("eval/")}  # before step 1
    assert not any(k.startswith("eval/") for k in m1)
    assert m2["eval/math_tiny/n_problems"] == 2  # the 64 fixture rows hold 2 distinct problems (1+1, 0+1)
    assert 0.0 <= m2["eval/math_tiny/avg@2"] <= m2["eval/math_tiny/pass@2"] <= 1.0
    official = tmp_path / "official"  # the official DSRL script: no validation before training
    res = run_cli(cli_args(tiny_model_dir, tiny_data, official, steps=1, **{"warmup-steps": 1, "eval-every": 1,
                  "eval-benchmarks": tiny_data, "eval-k": 2}) + ["--no-eval-before-train"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_jsonl(official / "metrics.jsonl")] == [1]


def test_logprobs_never_build_the_full_vocabulary_tensor(monkeypatch):
    """With Qwen3's real vocabulary (151,936), the largest logits tensor, forward and backward, is one chunk."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    V, chunk, T = 151_936, 64, 300
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         tie_word_embeddings=False))
    largest = [0]
    real_linear = F.linear

    def recording_linear(x, w, b=None):
        out = real_linear(x, w, b)
        if out.shape[-1] == V:
            largest[0] = max(largest[0], out.numel())
        return out
    monkeypatch.setattr(dsrl.F, "linear", recording_linear)
    responses = [list(range(5, 5 + T)), list(range(7, 7 + T // 2))]
    logp, mask = dsrl.logprob_y(model, 1, responses, 0, chunk=chunk)
    logp[mask].sum().backward()
    assert 0 < largest[0] <= chunk * V  # not (N, T, V) = 2 * 300 * V
    assert model.lm_head.weight.grad is not None


def test_sampler_prompt_sharing_draws_the_same_samples(tiny):
    """The sampler runs each prompt once and repeats its KV cache G times; with the same seed it draws exactly
    the samples of G separate copies of the prompt."""
    model, tok = tiny
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
                          capture_output=True, text=True, timeout=900, cwd=HERE)


def test_course_reference_scores_full_and_the_exercise_copy_zero(tmp_path):
    import course.make_exercises as kit
    ref = run_grade(os.path.join(HERE, "dsrl.py"))
    lines = ref.stdout.strip().splitlines()
    assert ref.returncode == 0 and lines[-1] == f"score={len(kit.EXERCISES)}/{len(kit.EXERCISES)}", ref.stdout + ref.stderr
    assert lines[:-1] == [f"exercise {n} {name}: PASS" for n, _, name, _ in kit.EXERCISES]
    res = subprocess.run([sys.executable, os.path.join(HERE, "course", "make_exercises.py"), tmp_path / "copy"],
                         capture_output=True, text=True, cwd=HERE)
    assert res.returncode == 0, res.stderr
    copy = run_grade(tmp_path / "copy" / "dsrl.py")
    lines = copy.stdout.strip().splitlines()
    assert copy.returncode == 1 and lines[-1] == f"score=0/{len(kit.EXERCISES)}", copy.stdout + copy.stderr
    for (n, filename, name, _), line in zip(kit.EXERCISES, lines):
        assert line.startswith(f"exercise {n} {name}: FAIL (NotImplementedError: Exercise {n}:"), line
    for filename in ("dsrl.py", "eval.py"):  # signatures and docstrings stay; only the bodies are gone
        ours, theirs = (ast.parse(open(os.path.join(d, filename)).read()) for d in (HERE, tmp_path / "copy"))
        for name in [e[2] for e in kit.EXERCISES if e[1] == filename]:
            a, b = (next(f for f in tree.body if getattr(f, "name", None) == name) for tree in (ours, theirs))
            assert ast.dump(a.args) == ast.dump(b.args) and ast.get_docstring(a) == ast.get_docstring(b), name
            assert isinstance(b.body[-1], ast.Raise) and len(b.body) == 2, name
    assert open(tmp_path / "copy" / "grader.py").read() == open(os.path.join(HERE, "grader.py")).read()


STUDENT_BUGS = {  # exercise -> (reference line, the same line with a classic student bug)
    1: ("adv = adv / (r.std(1, keepdim=True) + 1e-6)", "adv = adv / (r.std(1, keepdim=True, unbiased=False) + 1e-6)"),
    2: ('"neg": adv < 0', '"neg": adv <= 0'),  # NSR keeps A = 0 samples
    3: ("return token_logprobs(model, states, y, y_mask, temperature, chunk), y_mask",
        "return token_logprobs(model, states, y, y_mask, 1.0, chunk), y_mask"),  # ignores the temperature
    4: ("start = torch.full((y.shape[0], 1), start_id,", "start = torch.full((y.shape[0], 1), pad,"),  # wrong token
    5: ("dual = torch.minimum(loss, -adv * clip_dual)", "dual = loss"),  # no dual clip
    6: ("return (per_token * mask).sum() / max(n_tokens, 1)",  # a mean per sequence
        "return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()"),
    7: ('MODES["grpo" if mode == "dsrl" and step > warmup_steps else mode]',  # off by one
        'MODES["grpo" if mode == "dsrl" and step >= warmup_steps else mode]'),
}


@pytest.mark.parametrize("exercise", sorted(STUDENT_BUGS))
def test_course_grader_catches_each_classic_student_bug(tmp_path, exercise):
    good, bad = STUDENT_BUGS[exercise]
    source = open(os.path.join(HERE, "dsrl.py")).read()
    assert source.count(good) == 1, good
    (tmp_path / "dsrl.py").write_text(source.replace(good, bad))
    for name in ("eval.py", "grader.py", "scale.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    res = run_grade(tmp_path / "dsrl.py", exercise)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 1 and lines[-1] == "score=0/1", res.stdout + res.stderr
    assert " FAIL (" in lines[0] and "NotImplementedError" not in lines[0], lines[0]


def test_course_cpu_task_learns_under_grpo(tmp_path):
    """The CPU tier of the course: the built task, its flags line, and GRPO through the CLI raise the reward
    of the last 5 steps above the first 5 by at least 0.3 (the measured gain is +0.57)."""
    task = tmp_path / "task"
    res = subprocess.run([sys.executable, os.path.join(HERE, "course", "tiny_task.py"), task], capture_output=True,
                         text=True, timeout=600, cwd=HERE)
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
                "truncated_frac", "gen_tokens", "reward_timeout", "time_gen_s"):
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
    assert install.endswith("pytest matplotlib") and f"\n{install}\n" in ci and f"\n{test}\n" in ci


def test_dsrl_reads_in_the_papers_order_and_stays_short():
    """The shape promised to readers: at most 900 lines, short functions, sections in the paper's order."""
    source = open(os.path.join(HERE, "dsrl.py")).read()
    assert len(source.splitlines()) <= 970  # the method in ~900 lines, then the translation to the official launch
    tree = ast.parse(source)
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert sizes.pop("train") <= 100 and max(sizes.values()) <= 40, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    order = ["class Args", "def build_prompt", "def last_boxed", "def official_reward", "def reward(",
             "def sample_responses", "def logprob_y_given_x", "def logprob_y(", "def group_advantages",
             "def sample_mask", "def ppo_clip_loss", "def token_mean_loss", "def phase_for_step", "def policy_update",
             "def train(", "def save_checkpoint", "def resolve_resume", "def main("]
    positions = [source.index("\n" + name) for name in order]
    assert positions == sorted(positions)


# The official launch's keys (run_code/DSRL_qwen3-4b.sh and its ppo_trainer.yaml): Hydra rejects any other key.
OFFICIAL_KEYS = {
    "algorithm.adv_estimator", "algorithm.norm_adv_by_std_in_grpo", "algorithm.pretrain_norm_adv_by_std",
    "algorithm.pretrain_loss_coef", "algorithm.pretrain_loss_disable_step", "algorithm.pretrain_only_warmup",
    "algorithm.pretrain_only", "actor_rollout_ref.actor.negative_pretrain", "actor_rollout_ref.actor.positive_pretrain",
    "actor_rollout_ref.actor.positive_rl", "actor_rollout_ref.actor.negative_rl",
    "actor_rollout_ref.actor.pretrain_loss_agg_mode", "algorithm.use_kl_in_reward", "algorithm.kl_ctrl.kl_coef",
    "actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.kl_loss_coef", "data.train_files", "data.val_files",
    "data.prompt_key", "data.truncation", "data.max_prompt_length", "data.max_response_length", "data.train_batch_size",
    "data.val_batch_size", "data.prompt_template_type", "actor_rollout_ref.rollout.n",
    "actor_rollout_ref.rollout.temperature", "actor_rollout_ref.rollout.name", "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.clip_ratio_c", "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.grad_clip",
    "actor_rollout_ref.actor.entropy_coeff", "actor_rollout_ref.actor.loss_agg_mode",
    "actor_rollout_ref.actor.use_dynamic_bsz", "actor_rollout_ref.model.path",
    "actor_rollout_ref.model.enable_gradient_checkpointing", "trainer.n_gpus_per_node", "trainer.nnodes",
    "trainer.total_epochs", "trainer.save_freq", "trainer.test_freq", "trainer.val_before_train", "trainer.logger",
    "trainer.resume_mode"}


def verl_keys(*flags):
    res = run_cli(["--print-verl-command", "--output-dir", "/no/such/dir", "--model", "/no/such/model", *flags])
    assert res.returncode == 0, res.stderr[-2000:]
    comments = [line for line in res.stdout.splitlines() if line.startswith("#")]
    command = [line.strip().rstrip("\\").strip() for line in res.stdout.splitlines() if not line.startswith("#")]
    assert command[0] == "python3 -m verl.trainer.main_ppo"
    pairs = [item.split("=", 1) for item in command[1:]]
    assert len({k for k, _ in pairs}) == len(pairs) and {k for k, _ in pairs} <= OFFICIAL_KEYS
    return dict(pairs), comments


def test_print_verl_command_is_the_same_experiment_on_the_official_engine():
    start = time.time()
    keys, comments = verl_keys("--lr", "2e-6", "--group-size", 4, "--prompts-per-step", 32, "--max-new-tokens", 2048,
                               "--warmup-steps", 9, "--clip-high", 0.28)
    assert time.time() - start < 60 and not os.path.exists("/no/such/dir")  # nothing loaded, nothing trained
    assert {k: keys[k] for k in ("actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.rollout.n",
                                  "data.train_batch_size", "actor_rollout_ref.actor.ppo_mini_batch_size",
                                  "data.max_response_length", "algorithm.pretrain_loss_disable_step",
                                  "algorithm.pretrain_loss_coef", "algorithm.pretrain_only_warmup",
                                  "algorithm.pretrain_only", "actor_rollout_ref.actor.clip_ratio_low",
                                  "actor_rollout_ref.actor.clip_ratio_high", "actor_rollout_ref.actor.clip_ratio_c",
                                  "actor_rollout_ref.actor.negative_pretrain", "actor_rollout_ref.actor.positive_pretrain",
                                  "actor_rollout_ref.actor.negative_rl", "actor_rollout_ref.actor.positive_rl",
                                  "algorithm.pretrain_norm_adv_by_std", "trainer.total_epochs")} == {
        "actor_rollout_ref.actor.optim.lr": "2e-06", "actor_rollout_ref.rollout.n": "4", "data.train_batch_size": "32",
        "actor_rollout_ref.actor.ppo_mini_batch_size": "32", "data.max_response_length": "2048",
        "algorithm.pretrain_loss_disable_step": "10", "algorithm.pretrain_loss_coef": "0.01",
        "algorithm.pretrain_only_warmup": "True", "algorithm.pretrain_only": "False",
        "actor_rollout_ref.actor.clip_ratio_low": "0.2", "actor_rollout_ref.actor.clip_ratio_high": "0.28",
        "actor_rollout_ref.actor.clip_ratio_c": "10.0", "actor_rollout_ref.actor.negative_pretrain": "True",
        "actor_rollout_ref.actor.positive_pretrain": "False", "actor_rollout_ref.actor.negative_rl": "True",
        "actor_rollout_ref.actor.positive_rl": "True", "algorithm.pretrain_norm_adv_by_std": "False",
        "trainer.total_epochs": "2"}  # 348 steps x 32 prompts over MATH's 7,500 problems
    unmapped = [f.name for f in dsrl.dataclasses.fields(dsrl.Args) if f.name not in dsrl.VERL_KEYS]
    for name in set(unmapped) - {"print_verl_command"}:  # every other flag is listed, as a comment
        assert any(c.startswith(f"# --{name.replace('_', '-')} ") for c in comments), name


@pytest.mark.parametrize("mode,pretrain,rl,only", [("grpo", (False, False), (True, True), False),
                                                   ("nsr-prerl", (True, False), (False, False), True),
                                                   ("psr-prerl", (False, True), (False, False), True),
                                                   ("nsr-rl", (False, False), (True, False), False),
                                                   ("psr-rl", (False, False), (False, True), False)])
def test_print_verl_command_for_every_mode(mode, pretrain, rl, only):
    keys, _ = verl_keys("--mode", mode, "--steps", 40, "--eval-every", 5)
    a = "actor_rollout_ref.actor."
    assert (keys[a + "negative_pretrain"], keys[a + "positive_pretrain"]) == tuple(str(x) for x in pretrain)
    assert (keys[a + "negative_rl"], keys[a + "positive_rl"]) == tuple(str(x) for x in rl)
    assert (keys["algorithm.pretrain_only"], keys["algorithm.pretrain_only_warmup"]) == (str(only), "False")
    assert (keys["trainer.test_freq"], keys["trainer.val_before_train"]) == ("5", "True")


def test_readme_verl_table_is_the_code_mapping():
    readme = open(os.path.join(HERE, "README.md")).read()
    for name, keys in dsrl.VERL_KEYS.items():
        row = f"| `--{name.replace('_', '-')}` | " + ", ".join(f"`{k}`" for k in keys) + " |"
        assert row in readme, row


def test_bf16_path_generation_copy_and_autocast(tiny_model_dir, tiny_data, tmp_path):
    """The GPU recipe on CPU: fp32 master weights, a bf16 sampling copy re-synced after each update, bf16
    autocast for the loss forward."""
    model, tok = dsrl.load_model_and_tokenizer(tiny_model_dir, "cpu")
    gen = dsrl.generation_copy(model, torch.bfloat16)
    assert gen is not model and next(gen.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    dsrl.sync_generation_copy(gen, model)
    assert all(torch.equal(g, p.to(torch.bfloat16)) for g, p in zip(gen.parameters(), model.parameters()))
    out = tmp_path / "run"
    res = run_cli(cli_args(tiny_model_dir, tiny_data, out, steps=2, **{"warmup-steps": 1, "dtype": "bfloat16"}))
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["skipped"] for m in metrics] == [0, 0] and all(math.isfinite(m["grad_norm"]) for m in metrics)
    assert json.loads((out / "config.json").read_text())["resolved_dtype"] == "torch.bfloat16"


def test_approximations_and_repeating_decimals():
    assert math_reward("\\boxed{x \\approx 2.45}", "2.45") == 1.0
    assert math_reward("\\boxed{\\sqrt{6} \\approx 2.45}", "\\sqrt{6}") == 1.0
    assert math_reward("\\boxed{x \\approx 2.45}", "\\sqrt{6}") == 0.0  # a rounded value is not the exact one
    assert math_reward("\\boxed{0.1\\overline{6}}", "\\frac16") == 1.0
    assert math_reward("\\boxed{1.\\overline{6}}", "\\frac{5}{3}") == 1.0
    assert math_reward("\\boxed{0.\\overline{3}}", "0.33") == 0.0
    assert reward_outcome("\\boxed{" + "9" * 6000 + ".\\overline{3}}", "1")[0] == 0.0  # huge: no crash


def test_vectors_and_explicit_base_ten():
    assert math_reward("\\boxed{\\langle 1,2\\rangle}", "(1,2)") == 1.0
    assert math_reward("\\boxed{\\langle 1,2\\rangle}", "(2,1)") == 0.0
    assert math_reward("\\boxed{5_{10}}", "5") == 1.0


# ---- Memory plan and gradient checkpointing (scale.py) ----
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
    assert scale.use_checkpointing(dsrl.Args(), "cuda:0") and not scale.use_checkpointing(dsrl.Args(), "cpu")
    assert scale.use_checkpointing(dsrl.Args(gradient_checkpointing=True), "cpu")
    assert not scale.use_checkpointing(dsrl.Args(gradient_checkpointing=False), "cuda")


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
    fits_three = base + 3 * per_group + per_group // 2
    plan = scale.memory_plan(config, args, fits_three, "cpu", torch.float32, False)
    assert plan["gen_batch_size"] == 6 and plan["kv_cache"] == 3 * per_group
    explicit = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=5, prompts_per_step=5), fits_three, "cpu",
                                 torch.float32, False)
    assert explicit["gen_batch_size"] == 4  # kept as given, rounded down to whole groups of 2
    small = dict(prompts_per_step=40, micro_batch_size=1)  # sampling, not the loss, is the limit here
    one = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=2, **small), None, "cpu", torch.float32, False)
    free = base + max(one["activations"], 20 * one["kv_cache"])
    too_big = scale.memory_plan(config, _tiny_plan_args(gen_batch_size=80, **small), free, "cpu", torch.float32, False)
    assert not too_big["fits"] and too_big["suggestion"] == "--gen-batch-size 0"
    assert scale.memory_plan(config, _tiny_plan_args(gen_batch_size=0, **small), free, "cpu", torch.float32)["fits"]


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
    assert err[-1].startswith("error: this run does not fit") and "Traceback" not in "\n".join(err)
    suggestion = re.search(r"; use (--[-a-z0-9 ]+) \(see python dsrl.py --plan\)$", err[-1]).group(1)
    assert "--micro-batch-size" in suggestion or "--gradient-checkpointing" in suggestion
    assert not os.path.exists(tmp_path / "o")
    fixed = dsrl.parse_args(flags + suggestion.split())[0]
    assert scale.memory_plan(config, fixed, free, "cpu", torch.float32)["fits"]


def test_bf16_on_a_gpu_without_bf16_stops_with_one_line_and_auto_picks_fp32(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(scale, "bf16_supported", lambda: False)
    assert dsrl.resolve_dtype("auto", "cuda") == torch.float32
    assert scale.compute_dtype("auto", "cuda") == torch.float32
    rc = dsrl.main(["--model", tiny_model_dir, "--device", "cuda", "--dtype", "bfloat16", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --dtype bfloat16: Tesla T4 has no native bf16; use --dtype auto (fp32)"
    monkeypatch.setattr(scale, "bf16_supported", lambda: True)
    assert dsrl.resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.slow
def test_plan_flag_prints_the_plan_from_a_config_alone(tiny_model_dir, tmp_path):
    """--plan reads config.json only: a folder without weights or tokenizer is enough, and nothing is written."""
    only_config = tmp_path / "config_only"
    only_config.mkdir()
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), only_config)
    res = run_cli(["--plan", "--model", only_config, "--output-dir", tmp_path / "out", "--gen-batch-size", "6",
                   "--group-size", "2", "--micro-batch-size", "3", "--no-gradient-checkpointing"])
    assert res.returncode == 0, res.stderr[-2000:]
    n_params = scale.count_parameters(scale.model_config(str(only_config)))
    assert f"{n_params / 1e9:.2f} B parameters" in res.stderr
    for part in ("training state", "sampling copy", "KV cache", "--gen-batch-size 6", "--micro-batch-size 3",
                 "gradient checkpointing off", "peak"):
        assert part in res.stderr, part
    assert not os.path.exists(tmp_path / "out")
