"""tiny_task.py - a CPU-sized task on which RL visibly learns, for teaching DSRL without a GPU.

    python course/tiny_task.py OUT          # builds OUT/model, OUT/train.jsonl, OUT/test.jsonl, OUT/train_flags.txt
    python dsrl.py --model OUT/model --dataset OUT/train.jsonl $(cat OUT/train_flags.txt) --mode grpo \\
                   --output-dir OUT-grpo

The task: "Say 7" -> "\\boxed{7}". The answer is the digit at the end of the problem, a copy a 2-layer
model can learn. The problems come in a few phrasings ("Say 7", "Please say 7", ...); test.jsonl uses two
phrasings that train.jsonl never shows, all ending in the digit, so the test asks whether the policy
learnt to copy rather than to memorise.

The start: like RLVR, which starts from a base model that solves a problem only sometimes, the model is
fine-tuned (teacher forcing, response tokens only, always the exact format "\\boxed{d}<|im_end|>") in two
stages: (1) right answers only, until it copies (P(right) >= 0.9; 150-300 steps, depending on the seed): the
skill; (2) 200 steps on a MIX of right answers (30 %) and random digits (70 %), which lowers P(right) to
about 0.3 (0.3 + 0.7 / 10 once converged). So the policy samples the right digit about a third of the
time, groups hold right and wrong answers, and the reward (dsrl.reward: the last \\boxed{} against the
gold) has room to rise. Stage 1 matters: trained 300 steps on the mix alone, the model reaches P(right) 0.24,
0.10 (chance) or 0.28 for seeds 0, 1, 2 (copying is learnt late from a 30 % signal), and GRPO from the seed-1
model stays at chance (0.10 -> 0.13 in 120 steps): a policy that ignores the prompt gives RL nothing to reinforce.

Rows are problem + answer, so dsrl.py and eval.py put dsrl.SYSTEM_PROMPT in front as the system message
(the fine-tune uses the very same chat prompt, built by dsrl.build_prompt).

Importable pieces (test_dsrl.py may build its tiny models with them):
    CHAT_TEMPLATE, SPECIALS, make_tokenizer(), tiny_config(tokenizer, **overrides), make_model(tokenizer, seed),
    task_rows(n, templates, seed), chat_prompt(tokenizer, problem), supervised_warmup(model, tokenizer, rows, ...),
    answer_distribution(model, tokenizer, rows), marginal_distribution(model, tokenizer), JUNK,
    build_task(out_dir, seed=0, ...) -> dict of paths, TRAIN_FLAGS.

The junk variant (--junk SHARE --answers-alone SHARE, experiment d of the course): in the second stage a share
of the answers is an empty box, wrong for every prompt, and a share of the sequences is the answer alone after
<|im_start|>, so that the start model's P(y) is the marginal of its answers, as a pre-trained LM's is.
Needs torch, transformers and tokenizers (a transformers dependency), and ../dsrl.py for the prompt; all seeded.
"""
import argparse
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The special tokens of Qwen3's ChatML, in a fixed order: ids 0, 1, 2.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A ChatML template written for this task. Like Qwen3's: every message is "<|im_start|>ROLE\nTEXT<|im_end|>\n",
# add_generation_prompt opens the assistant turn, and enable_thinking=False adds the empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

TRAIN_TEMPLATES = ["Say {d}", "Please say {d}", "Reply with {d}", "Write {d}"]
TEST_TEMPLATES = ["Output {d}", "Your answer is {d}"]  # held-out phrasings, same ending as the train ones
ANSWER = "\\boxed{{{d}}}"  # the response is ANSWER + <|im_end|>
JUNK = "\\boxed{{}}"  # the junk variant's other answer: an empty box, wrong for every prompt

# The dsrl.py flags of the CPU tier (all but --model, --dataset, --mode, --output-dir).
# 120 steps of 16 prompts x 8 samples: 14-18 s on 2 cores (OMP_NUM_THREADS=1 if other work holds a core).
# lr 2e-4 rather than 1e-3: what the larger step does to the P(y) modes is a question of the course.
TRAIN_FLAGS = ("--steps 120 --prompts-per-step 16 --group-size 8 --max-new-tokens 12 --lr 2e-4 --warmup-steps 5 "
               "--device cpu --micro-batch-size 64 --save-every 1000 --save-total-limit 1")


def _dsrl():
    """The trainer module (for SYSTEM_PROMPT and build_prompt): the fine-tune must see the trainer's prompt."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import dsrl
    return dsrl


# ---- Tokenizer and model -----------------------------------------------------------------------------------
def make_tokenizer(chat_template=CHAT_TEMPLATE, specials=SPECIALS):
    """Character-level ChatML tokenizer: the specials, <unk>, printable ASCII and newline, one token each.
    EOS <|im_end|> (Qwen3 chat models), PAD <|endoftext|>. chat_template=None leaves the template out."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(list(specials) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    core.decoder = decoders.Fuse()  # join the characters back without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", additional_special_tokens=list(specials),
        eos_token="<|im_end|>" if "<|im_end|>" in specials else None,
        pad_token="<|endoftext|>" if "<|endoftext|>" in specials else None)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_config(tokenizer, **overrides):
    """A 2-layer Qwen3 (hidden 64, 4 query heads, 2 KV heads, 100 tokens): 86,912 parameters."""
    from transformers import Qwen3Config
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    stops = [i for i in stops if i is not None and i != tokenizer.unk_token_id]
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
              tie_word_embeddings=False, eos_token_id=stops[0] if stops else None,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    kw.update(overrides)
    return Qwen3Config(**kw)


def make_model(tokenizer, seed=0, **config_overrides):
    """A freshly initialised tiny Qwen3ForCausalLM; generation stops at <|im_end|> or <|endoftext|> (as Qwen3's)."""
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_config(tokenizer, **config_overrides))
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()]
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = True  # Qwen3 ships sampling settings; dsrl.py/eval.py override them anyway
    return model


# ---- The task ----------------------------------------------------------------------------------------------
def task_rows(n, templates=TRAIN_TEMPLATES, seed=0):
    """n rows {"problem", "answer"}: a random template and a random digit each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        d = rng.randrange(10)
        rows.append({"problem": rng.choice(templates).format(d=d), "answer": str(d)})
    return rows


def all_rows(templates):
    """Every (template, digit) pair once, sorted: the unique problems of a split."""
    return [{"problem": t.format(d=d), "answer": str(d)} for t in templates for d in range(10)]


def chat_prompt(tokenizer, problem):
    """Prompt ids exactly as dsrl.py builds them for a problem+answer row (system prompt, non-thinking)."""
    dsrl = _dsrl()
    return dsrl.build_prompt(tokenizer, dsrl.row_to_example({"problem": problem, "answer": "0"})["messages"], 10**6)


def response_ids(tokenizer, digit, template=ANSWER):
    return tokenizer(template.format(d=digit) + "<|im_end|>", add_special_tokens=False)["input_ids"]


def supervised_warmup(model, tokenizer, rows, steps=200, batch=32, lr=3e-3, p_right=0.3, seed=0, until=None,
                      check_every=50, log=None, p_junk=0.0, p_alone=0.0):
    """Teacher-forced fine-tune on chat prompt + "\\boxed{d}<|im_end|>", loss on the response tokens only.
    With probability p_right d is the gold digit, else a uniformly random digit (it may hit the gold too: the
    target accuracy is p_right + (1 - p_right) / 10). With probability p_junk the answer is JUNK (an empty box,
    wrong for every prompt) instead of ANSWER. With probability p_alone a sequence is the answer alone after
    <|im_start|> (the P(y) input of dsrl.py) instead of prompt + answer: like a pre-trained LM, the model then has
    a P(y) that is the marginal of its answers. until(model) -> bool, checked every check_every steps, stops early. Returns the number of steps run (the model is trained in place)."""
    rng = random.Random(seed)
    prompts = [(chat_prompt(tokenizer, r["problem"]), r["answer"]) for r in rows]
    pad, start = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    while step < steps:
        model.train()
        seqs, labels = [], []
        for _ in range(batch):
            p, gold = rng.choice(prompts)
            d = gold if rng.random() < p_right else str(rng.randrange(10))
            y = response_ids(tokenizer, d, JUNK if p_junk and rng.random() < p_junk else ANSWER)
            x = [start] if p_alone and rng.random() < p_alone else p
            seqs.append(x + y)
            labels.append([-100] * len(x) + y)
        ids, lab, mask = _pad(seqs, pad), _pad(labels, -100), _pad([[1] * len(s) for s in seqs], 0)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % check_every == 0:
            done = until is not None and until(model)
            if log:
                log(f"fine-tune step {step} (p_right {p_right}) loss {loss.item():.3f}")
            if done:
                break
    model.eval()
    return step


def _pad(seqs, value):
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


@torch.no_grad()
def answer_distribution(model, tokenizer, rows):
    """Mean probabilities by teacher forcing (no sampling): {"p_right": P(\\boxed{gold}<|im_end|> | x),
    "p_format": P(\\boxed{<any digit>}<|im_end|> | x), "p_junk": P(JUNK<|im_end|> | x), the empty box}."""
    model.eval()
    right, fmt, junk = [], [], []
    for r in rows:
        p = chat_prompt(tokenizer, r["problem"])
        boxed, bare = _answer_probs(model, tokenizer, p, ANSWER), _answer_probs(model, tokenizer, p, JUNK)
        right.append(boxed[int(r["answer"])].item())
        fmt.append(boxed.sum().item())
        junk.append(bare.sum().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"p_right": mean(right), "p_format": mean(fmt), "p_junk": mean(junk)}


@torch.no_grad()
def marginal_distribution(model, tokenizer):
    """The same in P(y), the answer alone after <|im_start|> (dsrl.logprob_y's input): {"p_format": P(\\boxed{<any
    digit>}<|im_end|>), "p_junk": P(JUNK<|im_end|>)}."""
    model.eval()
    start = [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    return {"p_format": _answer_probs(model, tokenizer, start, ANSWER).sum().item(),
            "p_junk": _answer_probs(model, tokenizer, start, JUNK).sum().item()}


def _answer_probs(model, tokenizer, prompt, template):
    """P(template(d) <|im_end|> | prompt) for d = 0..9, as a (10,) tensor (one entry if template has no {d})."""
    ys = [response_ids(tokenizer, d, template) for d in (range(10) if "{d}" in template else [0])]  # one length
    ids = torch.tensor([prompt + y for y in ys])  # (10, L)
    logp = model(input_ids=ids).logits[:, len(prompt) - 1:-1].float().log_softmax(-1)
    return logp.gather(2, torch.tensor(ys)[:, :, None]).sum((1, 2)).exp()


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def build_task(out_dir, seed=0, n_train=512, max_skill_steps=600, mix_steps=200, p_right=0.3, flags=TRAIN_FLAGS,
               log=None, p_junk=0.0, p_alone=0.0):
    """Build the whole task in out_dir; deterministic for a given seed (the fine-tune runs on one thread).
    The fine-tune has two stages: (1) right answers only, until the model copies (teacher-forced P(right) >= 0.9
    on the train problems, checked every 50 steps, at most max_skill_steps); (2) mix_steps on the mix of
    p_right right and 1 - p_right random answers, which brings P(right) down to about p_right + (1 - p_right) / 10.
    p_junk > 0 (the junk variant): in stage 2 a share p_junk of the answers is an empty box, so the start model
    gives that answer, wrong for every prompt, in about p_junk of its samples. p_alone > 0: in stage 2 that share
    of the sequences is the answer alone after <|im_start|>, so that P(y) is the marginal of the answers.
    Returns {"model", "train", "test", "flags"} paths and "start": the start model's P(right) / P(format)."""
    os.makedirs(out_dir, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same model, on any machine
    try:
        tok = make_tokenizer()
        model = make_model(tok, seed)
        train_rows = task_rows(n_train, TRAIN_TEMPLATES, seed)
        copies = lambda m: answer_distribution(m, tok, all_rows(TRAIN_TEMPLATES))["p_right"] >= 0.9  # noqa: E731
        skill = supervised_warmup(model, tok, train_rows, steps=max_skill_steps, p_right=1.0, seed=seed, until=copies,
                                  log=log)
        if skill >= max_skill_steps and not copies(model):
            print(f"warning: the model did not learn to copy in {skill} steps (seed {seed}); RL will have little to "
                  "reinforce: raise max_skill_steps", file=sys.stderr)
        supervised_warmup(model, tok, train_rows, steps=mix_steps, p_right=p_right, seed=seed + 1, log=log,
                          p_junk=p_junk, p_alone=p_alone)
        model_dir = os.path.join(out_dir, "model")
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        start = {"train": answer_distribution(model, tok, all_rows(TRAIN_TEMPLATES)),
                 "test": answer_distribution(model, tok, all_rows(TEST_TEMPLATES)),
                 "marginal": marginal_distribution(model, tok),
                 "skill_steps": skill, "mix_steps": mix_steps, "p_junk": p_junk, "p_alone": p_alone}
    finally:
        torch.set_num_threads(threads)
    paths = {"model": model_dir,
             "train": write_jsonl(train_rows, os.path.join(out_dir, "train.jsonl")),
             "test": write_jsonl(all_rows(TEST_TEMPLATES), os.path.join(out_dir, "test.jsonl"))}
    paths["flags"] = os.path.join(out_dir, "train_flags.txt")
    with open(paths["flags"], "w") as fh:
        fh.write(flags + "\n")
    with open(os.path.join(out_dir, "start_model.json"), "w") as fh:
        json.dump(start, fh, indent=2)
    return {**paths, "start": start}


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the tiny CPU task (model, train/test jsonl, dsrl.py flags)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-skill-steps", type=int, default=600, help="at most this many steps on right answers only")
    p.add_argument("--mix-steps", type=int, default=200, help="then fine-tune steps on the right/random mix")
    p.add_argument("--p-right", type=float, default=0.3, help="share of right answers in the warm-up data")
    p.add_argument("--junk", type=float, default=0.0, metavar="SHARE",
                   help="the junk variant: this share of the mix answers with an empty box (wrong for every prompt)")
    p.add_argument("--answers-alone", type=float, default=0.0, metavar="SHARE",
                   help="this share of the mix's sequences is the answer alone after <|im_start|> (trains P(y))")
    p.add_argument("--flags", default=TRAIN_FLAGS, help="the dsrl.py flags written to OUT/train_flags.txt")
    a = p.parse_args(argv)
    for flag, share in (("--junk", a.junk), ("--answers-alone", a.answers_alone)):
        if not 0.0 <= share < 1.0:
            p.error(f"{flag} {share}: give a share in [0, 1), e.g. {flag} 0.5")
    t0 = time.time()
    out = build_task(a.out_dir, a.seed, max_skill_steps=a.max_skill_steps, mix_steps=a.mix_steps, p_right=a.p_right,
                     log=print, p_junk=a.junk, p_alone=a.answers_alone, flags=a.flags)
    s = out["start"]
    print(f"start model ({s['skill_steps']} + {s['mix_steps']} fine-tune steps): P(right) train "
          f"{s['train']['p_right']:.2f} test {s['test']['p_right']:.2f}, P(format) train {s['train']['p_format']:.2f}, "
          f"P(empty box) train {s['train']['p_junk']:.2f}")
    print(f"built {a.out_dir} in {time.time() - t0:.0f}s; train with:\n  python dsrl.py --model {out['model']} "
          f"--dataset {out['train']} $(cat {out['flags']}) --mode grpo --output-dir {a.out_dir.rstrip('/')}-grpo")


if __name__ == "__main__":
    main()
