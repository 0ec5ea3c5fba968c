"""dsrl.py - Dual Space RL (DSRL) for math reasoning, in one file.

Paper:    From P(y|x) to P(y): Investigating Reinforcement Learning in Pre-train Space (Tan et al., 2026, 2604.14142).
Official: github.com/Trae1ounG/Pretrain_Space_RLVR, a verl fork whose semantics this file reproduces (see README).

The idea in four lines. Sample G answers per problem from the policy P(y|x) and score them (0/1).
NSR-PreRL: push DOWN log P(y) = sum_t log pi(y_t | <|im_start|>, y_<t) of the wrong answers, i.e. the
gradient goes through the model *without the prompt* ("pre-train space"). DSRL: do that for a short
warm-up, then hand the weights over to ordinary GRPO in P(y|x) ("policy reincarnation").

Run:   python dsrl.py --model Qwen/Qwen3-0.6B  (one GPU);  --mode grpo|nsr-prerl|...;  --output-dir runs/x --resume

Departures from the official code (the same list is in README.md, "Departures"):
 1. Token-mean over ALL kept tokens of the step (official: per micro-batch, micro-batches weighted by their share of
    sequences): the clean definition, and micro-batching is exact.
 2. Work that cannot change the gradient is skipped: no P(y|x) forward in P(y)-only steps, no P(y) forward in GRPO
    steps, none for masked or A = 0 samples (their tokens still count in the GRPO denominator, as officially). A
    prompt's G samples share one forward of it (sampler and P(y|x) loss). Official: computes all, multiplies by 0.
 3. No old-log-prob pass: with one update per batch the PPO ratio is exactly 1, so old_logp = logp.detach(); the
    clipped (and dual-clipped) form is kept for the general case.
 4. Reward: by default grader.py's equivalence checker (strings, exact rationals, 60-digit mpmath numerics; never eval
    or sympy): it accepts all the official Hendrycks scorer accepts but hedges ("42 or 43", "at least 12"), and more
    (0.50 = 1/2). `--reward official` is the official scorer.
 5. Sampling with Hugging Face `generate` (official: vLLM) from a bf16 copy of the fp32 master weights, re-synced
    after every update (official: FSDP fp32 master + bf16 rollout engine).
 6. One-GPU defaults: Qwen3-0.6B, 16 prompts x 8 samples, 1,024 new tokens, checkpoints every 50 steps (official:
    Qwen3-4B, 128 x 8, 8,192); loss, clip and optimizer as officially. Evaluation only with --eval-every (official:
    every 5 steps), then also before step 1 (official: not).
 7. `--warmup-steps W` counts warm-up UPDATES: steps 1..W in P(y), W+1.. in P(y|x); the official
    `pretrain_loss_disable_step=D` runs 1..D-1 in P(y), so W = D - 1 (default 19).
 8. Rows with an empty ground truth are skipped (4 in the official MATH file; officially kept, they only add A = 0
    samples to their step's GRPO denominator): the data order shifts.
 9. Gradient checkpointing (official: on): on with CUDA, off on CPU; P(y|x)'s shared prompt forward is not checkpointed.
 10. Diagnostics: of the samples a step runs (2), in its space, over the whole step (1). Official: of all responses,
     per micro-batch; also the P(y|x) entropy in P(y) steps and rl_div_pretrain_ratio, from forwards we skip (2).
"""

import argparse, copy, dataclasses, functools, glob, inspect, json, math, os  # noqa: E401 (standard library)
import importlib.util, random, re, shutil, signal, sys, tempfile, time  # noqa: E401
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import safetensors
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import grader, scale  # noqa: E401 (the reward's answer checker; where a run fits: memory plan, official launch)

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
START_TOKEN = "<|im_start|>"   # the one token that stands in for the prompt in P(y) space
STOP_TOKEN = "<|im_end|>"      # chat end of turn: Qwen's EOS for chat responses
DEFAULT_DATASET = "DigitalLearningGmbH/MATH-lighteval"
# mode -> (space, samples): "y" = P(y), "y|x" = P(y|x); "neg" (NSR) keeps A < 0, "pos" (PSR) A > 0, "all" all.
MODES = {"dsrl": ("y", "neg"), "grpo": ("y|x", "all"), "nsr-prerl": ("y", "neg"), "psr-prerl": ("y", "pos"),
         "nsr-rl": ("y|x", "neg"), "psr-rl": ("y|x", "pos")}  # nsr-rl / psr-rl: the ablations with the prompt kept

# ---- Settings: one source of truth. The help line names the official value where ours differs. -------------
def flag(default, help_text):  # a field of Args: its default and its --help line
    return field(default=default, metadata={"help": help_text})

@dataclass
class Args:
    model: str = flag("Qwen/Qwen3-0.6B", "hub id or local path of a causal LM (official: Qwen3-4B)")
    dataset: str = flag(DEFAULT_DATASET, "hub id or .parquet/.jsonl/.json/.csv: verl rows, problem+answer/solution")
    mode: str = flag("dsrl", "one of: " + ", ".join(MODES))
    warmup_steps: int = flag(19, "dsrl: warm-up updates before GRPO (official pretrain_loss_disable_step=20 -> 19)")
    warmup_space: str = flag("y", "dsrl: warm-up in y = P(y) (NSR-PreRL) or 'y|x' (NSR-RL: the paper's ablation)")
    prerl_coef: float = flag(0.01, "scale of the P(y) loss (official pretrain_loss_coef)")
    steps: int = flag(348, "optimizer steps in total (official: 348 = 6 epochs of 128 prompts)")
    prompts_per_step: int = flag(16, "prompts per step (official: 128)")
    group_size: int = flag(8, "responses sampled per prompt, G >= 2")
    max_prompt_tokens: int = flag(1024, "prompts longer than this are cut from the left")
    max_new_tokens: int = flag(1024, "response length limit (official: 8192)")
    temperature: float = flag(1.0, "sampling temperature; log-probs use the same one")
    top_p: float = flag(1.0, "nucleus sampling")
    lr: float = flag(1e-6, "AdamW learning rate, constant")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    clip_low: float = flag(0.2, "PPO clip epsilon below 1")
    clip_high: float = flag(0.2, "PPO clip epsilon above 1 (official GRPO baseline script: 0.28)")
    clip_dual: float = flag(10.0, "dual-clip constant c for negative advantages")
    grad_clip: float = flag(1.0, "gradient-norm clip")
    micro_batch_size: int = flag(8, "sequences per forward/backward (gradient accumulation, exact)")
    gen_batch_size: int = flag(0, "sequences per generate call (whole groups), 0 = auto: the most that fit")
    kv_cache: str = flag("dynamic", "generate's KV cache: dynamic, static (compiled on GPU) or compile (everywhere)")
    logprob_chunk: int = flag(256, "tokens per chunk of the vocabulary projection (~ 4 x chunk x vocab x 4 bytes)")
    reward: str = flag("math", "math (equivalence checker) or official (exact official string scorer)")
    seed: int = flag(0, "seed for data order, sampling and init of everything random")
    output_dir: str = flag("runs/dsrl", "where config, metrics, samples and checkpoints go")
    save_every: int = flag(50, "checkpoint every N steps (and always at the end)")
    save_total_limit: int = flag(2, "keep only the last N checkpoints, 0 = keep all")
    resume: str = flag("", "continue from the latest checkpoint in --output-dir (bare flag) or from a checkpoint path")
    max_bad_steps: int = flag(5, "stop after this many non-finite steps in a row")
    eval_every: int = flag(0, "run eval.py accuracy every N steps, 0 = never (official: 5)")
    eval_benchmarks: str = flag("aime24,aime25,amc23", "benchmarks for --eval-every (names or files)")
    eval_k: int = flag(4, "samples per problem for --eval-every (official: 20)")
    eval_before_train: bool = flag(True, "with --eval-every, a step-0 row too (official: DSRL script off, GRPO on)")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = flag("auto", "compute dtype: auto (bf16 on a GPU that has it, else fp32); weights stay fp32")
    gradient_checkpointing: bool = flag(None, "recompute layers in the loss backward (official: on); unset: on CUDA")
    deterministic: bool = flag(False, "torch's deterministic algorithms (GPU; CPU runs repeat bit for bit anyway)")
    print_verl_command: bool = flag(False, "print the official multi-GPU launch of this experiment (verl) and exit")
    plan: bool = flag(False, "print the memory plan of these flags on this device and exit (reads config.json only)")
    report_to: str = flag("", "live curves: tensorboard, wandb or both (comma-separated)")

RESUMABLE_CHANGES = {"steps", "output_dir", "resume", "save_every", "save_total_limit", "device", "micro_batch_size",
                     "gen_batch_size", "kv_cache", "logprob_chunk", "max_bad_steps", "eval_every", "eval_benchmarks",
                     "eval_k", "eval_before_train", "deterministic", "gradient_checkpointing", "plan", "report_to"}

class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""

def scale_call(fn, *args):  # scale.py imports nothing of ours: its one-line ValueErrors are our usage errors
    try:
        return fn(*args)
    except ValueError as e:
        raise UsageError(str(e)) from None

CHOICES = {"mode": list(MODES), "reward": ["math", "official"], "kv_cache": ["dynamic", "static", "compile"],
           "dtype": ["auto", "bfloat16", "float32"], "warmup_space": ["y", "y|x"]}

def build_parser():
    """One --flag per field of Args. Defaults stay in Args, so the parsed namespace holds the given flags only."""
    p = argparse.ArgumentParser(description="DSRL: NSR-PreRL in P(y), then GRPO", argument_default=argparse.SUPPRESS)
    for f in fields(Args):
        kw = {"help": f.metadata["help"] + f" (default: {f.default})"}
        if f.name == "resume":
            kw.update(nargs="?", const="latest")
        elif isinstance(f.default, bool) or f.default is None:  # --deterministic / --no-deterministic; None: by device
            kw["action"] = "store_true" if f.name in ("print_verl_command", "plan") else argparse.BooleanOptionalAction
        elif f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        else:
            kw["type"] = type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p

def parse_args(argv=None):
    """-> (Args, names of the flags given on the command line: on --resume the others take the run's values)."""
    given = vars(build_parser().parse_args(argv))
    return Args(**given), set(given)

def check_args(a: Args):
    checks = [
        (a.group_size >= 2, f"--group-size {a.group_size}: needs >= 2 (with one sample every advantage is 0)"),
        (a.steps >= 1 and a.prompts_per_step >= 1, "--steps and --prompts-per-step must be >= 1"),
        (a.warmup_steps >= 0 and (a.mode != "dsrl" or a.warmup_steps <= a.steps),
         f"--warmup-steps {a.warmup_steps}: must be between 0 and --steps {a.steps}"),
        (a.mode == "dsrl" or a.warmup_space == "y", f"--warmup-space {a.warmup_space}: only --mode dsrl warms up"),
        (a.lr > 0, f"--lr {a.lr}: must be > 0"), (a.weight_decay >= 0, "--weight-decay must be >= 0"),
        (a.prerl_coef > 0, "--prerl-coef must be > 0"),
        (a.temperature > 0 and 0 < a.top_p <= 1, "--temperature must be > 0 and --top-p in (0, 1]"),
        (min(a.max_new_tokens, a.max_prompt_tokens, a.micro_batch_size, a.logprob_chunk) >= 1 and a.gen_batch_size >= 0,
         "--max-new-tokens, --max-prompt-tokens, --micro-batch-size, --logprob-chunk must be >= 1"),
        (a.clip_low > 0 and a.clip_high > 0 and a.clip_dual > 1 and a.grad_clip > 0,
         "--clip-low, --clip-high and --grad-clip must be > 0, --clip-dual > 1"),
        (a.save_every >= 1 and a.save_total_limit >= 0, "--save-every must be >= 1 and --save-total-limit >= 0"),
        (a.max_bad_steps >= 1 and a.eval_every >= 0 and a.eval_k >= 1,
         "--max-bad-steps and --eval-k must be >= 1, --eval-every >= 0"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device), f"--device {a.device}: give auto, cpu, cuda or cuda:N"),
        (not (a.deterministic and a.top_p < 1 and resolve_device(a.device).startswith("cuda")), "--deterministic with "
         "--top-p < 1: top-p's float cumsum on CUDA raises or varies in some torch versions; use --top-p 1"),
        (set(a.report_to.split(",")) <= {"", "tensorboard", "wandb"}, "--report-to: tensorboard and/or wandb"),
        (all(importlib.util.find_spec(n) for n in a.report_to.split(",") if n in ("tensorboard", "wandb")),
         f"--report-to {a.report_to}: not installed (pip install {a.report_to.replace(',', ' ')})"),
    ]
    failed = [message for ok, message in checks if not ok]
    if failed:
        raise UsageError(failed[0])

# ---- Data and the chat prompt ------------------------------------------------------------------------------
def read_rows(source: str, split: str = "train") -> list:  # rows of a data file or a hub dataset (scale.py reads)
    return scale_call(scale.read_rows, source, split)

def row_to_example(row: dict):
    """One row -> {"messages": chat, "answer": gold}, or None if malformed. Accepted: the official verl format
    (prompt = chat messages, reward_model.ground_truth), problem + answer, problem + solution (its last box)."""
    if isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
        messages = [m for m in row["prompt"] if isinstance(m, dict) and m.get("content")]
        gold = row["reward_model"].get("ground_truth")
    elif "problem" in row and ("answer" in row or "solution" in row):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["problem"]}]
        gold = row["answer"] if "answer" in row else last_boxed(str(row.get("solution") or ""))
    else:
        return None
    if (not messages or not all(isinstance(m.get("content"), str) for m in messages)
            or messages[-1].get("role") != "user" or gold is None or not str(gold).strip()):
        return None
    return {"messages": messages, "answer": str(gold).strip()}

def load_problems(source: str, split: str = "train"):
    """Returns (examples, n_malformed). Unknown columns or nothing usable -> UsageError."""
    rows = read_rows(source, split)
    if not rows:
        raise UsageError(f"dataset {source} is empty")
    columns = sorted({k for r in rows[:100] for k in r if k != "__malformed__"})
    known = ({"prompt", "reward_model"}, {"problem", "answer"}, {"problem", "solution"})
    if not any(need <= set(columns) for need in known):
        raise UsageError(f"dataset {source} has columns {columns}; need prompt+reward_model (verl), "
                         "problem+answer or problem+solution")
    examples = [e for e in (row_to_example(r) for r in rows) if e is not None]
    if not examples:
        raise UsageError(f"dataset {source}: none of its {len(rows)} rows has a problem and a non-empty answer")
    return examples, len(rows) - len(examples)

def build_prompt(tokenizer, messages, max_prompt_tokens: int) -> list:
    """Chat template with the generation prompt; Qwen3 in non-thinking mode ("qwen3_no_thinking").
    Templates that do not know `enable_thinking` ignore it. Too long: keep the last tokens (left truncation)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]

@functools.lru_cache(maxsize=2)
def data_order(n_examples: int, seed: int, epoch: int) -> list:
    """A fixed permutation per epoch: the data order is a function of (seed, step), so resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_examples, generator=g).tolist()

def batch_indices(n_examples: int, seed: int, step: int, batch: int) -> list:
    """Dataset indices of the prompts of optimizer step `step` (1-based); epochs roll over."""
    positions = (divmod(pos, n_examples) for pos in range((step - 1) * batch, step * batch))
    return [data_order(n_examples, seed, epoch)[offset] for epoch, offset in positions]

# ---- Reward: r = 1 iff the last \boxed{} of the response is equivalent to the gold answer ------------------
def last_boxed(text):
    """The answer: the content of the last top-level \\boxed{}/\\fbox{} (or `\\boxed 5`), None if absent or cut off.
    grader.py's, so that training, evaluation and the grader's command line read the same answer."""
    return grader.last_box(text)

# The official scorer (verl/utils/reward_score/math.py): Hendrycks MATH normalisation, then string equality.
def _fix_fracs(string):
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    out, *subs = string.split('\\frac')
    for sub in subs:
        if sub[0] != '{' and len(sub) < 2:  # IndexError on a trailing "\frac" is official behaviour
            return string
        out += '\\frac' + (sub if sub[0] == '{' else '{%s}{%s}%s' % (sub[0], sub[1], sub[2:]) if sub[1] != '{'
                            else '{%s}%s' % (sub[0], sub[1:]))
    return out

def _fix_a_slash_b(string):
    """"3/4" -> \\frac{3}{4} for integers only (a ValueError escapes, as officially; the caller falls back)."""
    if len(string.split('/')) != 2:
        return string
    a, b = (int(x) for x in string.split('/'))
    return '\\frac{%d}{%d}' % (a, b) if string == '%d/%d' % (a, b) else string

def _fix_sqrt(string):
    """\\sqrt2 -> \\sqrt{2}."""
    parts = string.split('\\sqrt')
    return parts[0] + ''.join('\\sqrt' + (sub if sub[0] == '{' else '{' + sub[0] + '}' + sub[1:]) for sub in parts[1:])

def strip_string(s):
    """Hendrycks MATH normalisation, as in verl/utils/reward_score/math.py (may raise, like it)."""
    for old, new in (('\n', ''), ('\\!', ''), ('\\\\', '\\'), ('tfrac', 'frac'), ('dfrac', 'frac'), ('\\left', ''),
                     ('\\right', ''), ('^{\\circ}', ''), ('^\\circ', ''), ('\\$', '')):
        s = s.replace(old, new)
    if '\\text{ ' in s:  # remove units on the right; two of them raise (officially an AssertionError)
        s, _ = s.split('\\text{ ')
    s = s.replace('\\%', '').replace(' .', ' 0.').replace('{.', '{0.')
    s = '0' + s if s[:1] == '.' else s
    if len(s.split('=')) == 2 and len(s.split('=')[0]) <= 2:
        s = s.split('=')[1]
    s = _fix_fracs(_fix_sqrt(s).replace(' ', '')) if s else s
    return _fix_a_slash_b('\\frac{1}{2}' if s == '0.5' else s) if s else s

def _official_last_boxed(string):
    idx = string.rfind('\\boxed')
    if '\\boxed ' in string:
        return '\\boxed ' + string.split('\\boxed ')[-1].split('$')[0]
    if idx < 0 and (idx := string.rfind('\\fbox')) < 0:
        return None
    depth = 0
    for i in range(idx, len(string)):  # same scan as the original, braces counted from idx
        depth += (string[i] == '{') - (string[i] == '}')
        if string[i] == '}' and depth == 0:
            return string[idx:i + 1]
    return None

def official_reward(response, gold):
    """verl's math.compute_score: 1.0 iff strip_string(last box) == strip_string(gold)."""
    try:
        box = _official_last_boxed(response)
        if box is None or not box.startswith(('\\boxed ', '\\boxed{')):  # "\fbox{..}" fails an assert officially
            return 0.0
        answer = box[len('\\boxed '):] if box.startswith('\\boxed ') else box[len('\\boxed{'):-1]
        try:
            return float(strip_string(answer) == strip_string(gold))
        except Exception:  # the official is_equiv falls back to comparing the raw strings
            return float(answer == gold)
    except Exception:
        return 0.0

REWARD_OUTCOMES = grader.OUTCOMES  # right / wrong / no_box / unparseable / timeout: counted apart in the logs

def reward(response, gold, kind="math"):
    """(r, outcome) of one response. "official": the official string scorer alone. "math": whatever the
    official scorer accepts, unless hedged, else grader.py's equivalence of the last box and the gold."""
    official = official_reward(response, gold)
    if kind == "official":
        return official, "right" if official else ("no_box" if last_boxed(response) is None else "wrong")
    return grader.grade(last_boxed(response), gold, official_equal=official == 1.0)

def score(responses, golds, kind: str = "math"):
    """Rewards (list of float) and outcome counts for a batch of responses."""
    results = [reward(response, gold, kind) for response, gold in zip(responses, golds)]
    return [r for r, _ in results], {o: sum(outcome == o for _, outcome in results) for o in REWARD_OUTCOMES}

# ---- Sampling from P(y|x) ----------------------------------------------------------------------------------
def token_id(tokenizer, token: str) -> int:
    """Id of a special token, taken from the tokenizer (never hard-coded)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or not isinstance(tid, int):
        raise UsageError(f"tokenizer has no {token} token; DSRL needs a ChatML tokenizer (e.g. Qwen) "
                         f"so that {token} can stand in for the prompt")
    return tid

def stop_ids(tokenizer, model=None) -> list:
    """<|im_end|>, the tokenizer's EOS and the generation_config's EOS ids (Qwen3: + <|endoftext|>), as officially."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(STOP_TOKEN)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)

def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

def left_pad(seqs, pad: int, device):
    """Left-padded (N, L) ids and attention mask; position ids come from the mask (see positions_from_mask)."""
    ids, mask = right_pad([s[::-1] for s in seqs], pad, device)  # pad the reversed rows on the right, flip back
    return ids.flip(1), mask.flip(1).long()

def right_pad(seqs, pad: int, device):
    """Right-padded (N, T) ids and a bool mask of the real tokens."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], True, pad)
    mask = torch.arange(ids.shape[1])[None] < torch.tensor([len(s) for s in seqs])[:, None]  # (N, T)
    return ids.to(device), mask.to(device)

def positions_from_mask(mask):
    """Real positions for left-padded rows: 0 at the first real token (as `generate` does it)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)

def autocast(device, dtype):
    """bf16 compute on fp32 master weights (as the official FSDP mixed precision); fp32 needs no context."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype=dtype)

def cache_arg(model) -> str:
    """Name of the KV-cache argument: `cache` in current transformers, `past_key_values` before the rename."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"

def cache_options(kv_cache: str) -> dict:
    """generate's cache settings for --kv-cache: dynamic (our shared-prompt cache), static (transformers compiles
    its decode step on a GPU) or compile (static, compiled on any device)."""
    if kv_cache == "dynamic":
        return {}
    from transformers import CompileConfig
    compile_config = CompileConfig(dynamic=None)
    compile_config._compile_all_devices = True  # also on CPU
    return {"cache_implementation": "static", **({"compile_config": compile_config} if kv_cache == "compile" else {})}

def shared_prompt_cache(model, ids, mask, group_size):
    """The G samples of a prompt share its prefix: the prompt but its last token runs once through the body (no
    logits: Qwen3 has 151,936 per position) and its KV cache is repeated G times; generate starts from the last."""
    prefix = model.base_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                              position_ids=positions_from_mask(mask[:, :-1]), use_cache=True)
    cache = prefix[cache_arg(model)]
    cache.batch_repeat_interleave(group_size)
    return cache

@torch.inference_mode()  # lighter than no_grad (no version counters): 5-10% faster decoding on CPU
def sample_responses(model, tokenizer, prompt_ids, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                     batch_size=0, min_new_tokens=0, dtype=torch.float32, kv_cache="dynamic", share_prompt=True):
    """G samples per prompt from P(y|x), prompt-major (sample i*G+g belongs to prompt i). Overrides the model's
    generation_config: temperature and top_p as given, no top_k, min_p or repetition penalty (official: vLLM,
    top_k -1). -> (response_ids, truncated): a response ends with its stop token unless cut at max_new_tokens."""
    device, options = next(model.parameters()).device, cache_options(kv_cache)
    stops, pad = stop_ids(tokenizer, model), pad_id(tokenizer)
    share_prompt = share_prompt and kv_cache == "dynamic"  # a static cache is allocated by generate itself
    per_call = max(1, (batch_size or group_size * len(prompt_ids)) // group_size)  # whole groups per call
    responses, truncated = [], []
    for s in range(0, len(prompt_ids), per_call):
        ids, mask = left_pad(prompt_ids[s:s + per_call], pad, device)  # (B, L), one row per prompt
        with autocast(device, dtype):
            if share_prompt and ids.shape[1] > 1:
                options[cache_arg(model)] = shared_prompt_cache(model, ids, mask, group_size)
            out = model.generate(input_ids=ids.repeat_interleave(group_size, 0),
                                 attention_mask=mask.repeat_interleave(group_size, 0), do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=0, min_p=None, repetition_penalty=1.0,
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, use_cache=True, **options)
        for row in out[:, ids.shape[1]:].tolist():  # (B*G, T_new): keep up to the first stop token, drop the padding
            end = next((k + 1 for k, t in enumerate(row) if t in stops), None)
            responses.append(row[:end])
            truncated.append(end is None)  # cut at max_new_tokens
    vars(model).pop("_cache", None)  # transformers 4.x keeps generate's static cache on the model: free it for the loss
    return responses, truncated

# ---- Log-probs of y in the two spaces: P(y|x) (prompt kept) and P(y) (prompt replaced by <|im_start|>) -----
def resolve_device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if "OMP_NUM_THREADS" not in os.environ:  # CPU threads wait for each other at each op: one busy core stalls all,
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) // 2)))  # so half the cores
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name

def resolve_dtype(name: str, device: str):
    """--dtype: auto = bf16 on a GPU with native bf16, else fp32 (CPU, or a T4: fp32 compute works there, bf16
    would be emulated). bf16 asked of a GPU without it is a UsageError, before anything loads."""
    cuda = resolve_device(device).startswith("cuda")
    native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bfloat16" and cuda and not native_bf16:
        raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name()} has no native bf16; "
                         "use --dtype auto (fp32)")
    return getattr(torch, name) if name != "auto" else torch.bfloat16 if native_bf16 else torch.float32

def use_checkpointing(args, device) -> bool:
    """--gradient-checkpointing: on with CUDA (as the official run), off on CPU; the flag overrides either way."""
    return str(device).startswith("cuda") if args.gradient_checkpointing is None else bool(args.gradient_checkpointing)

@contextmanager
def checkpointed_layers(model, enabled=True):  # official: actor_rollout_ref.model.enable_gradient_checkpointing
    """Within the block, each decoder layer recomputes its activations in backward (non-reentrant checkpoint). Hugging
    Face's own switch drops the KV cache the shared prompt forward needs: read through `read_only_cache` here."""
    layers = list(model.base_model.layers) if enabled else []
    for layer in layers:  # an instance attribute shadows the class's forward for this block only
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward

def read_only_cache(cache):
    """The prompt's KV cache, read by the response pass, never appended to: a layer recomputed under checkpointing
    sees the same keys and values again. Same numbers as DynamicCache's update (prompt's + new keys/values)."""
    def update(key_states, value_states, layer_idx, *args, **kwargs):
        layer = cache.layers[layer_idx]
        return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)
    cache.update = update
    return cache

def _chunk_logprob(hidden, targets, weight, bias, temperature, stop_id=-1):
    """log pi(target | state) for (K, H) states. Logits (K, V) live only inside this chunk. stop_id >= 0: also the
    (K, 7) diagnostics of the full distribution: entropy, log-prob, prob, top-1/2/3 probs, P(stop token)."""
    on = torch.is_autocast_enabled(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=on, cache_enabled=False):
        logits = F.linear(hidden, weight, bias).float()  # (K, V); a bf16 weight per chunk: grads add up in fp32
    if temperature != 1.0:  # the official actor divides by the rollout temperature; at 1.0 skip the copy
        logits = logits / temperature
    log_probs = logits.log_softmax(-1)  # backward keeps its output only: 3 (K, V) copies (bench/logprob_memory.py)
    logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)  # (K,)
    if stop_id < 0:
        return logp, None
    with torch.no_grad():  # as the official actor logs them; entropy -sum_v p_v log p_v = verl's log Z - sum_v p_v z_v
        p = log_probs.exp()
        top, stop = p.topk(3, -1).values, p[:, stop_id].clone()  # copies: p is reused below
        entropy = -p.mul_(log_probs).sum(-1)
        return logp, torch.stack([entropy, logp, logp.exp(), *top.T, stop], 1)

DIAGNOSTICS = {}  # policy_loss_backward sets "stop_id"; token_logprobs then adds each pass's per-token diagnostics

def token_logprobs(model, states, targets, target_mask, temperature, chunk):
    """Per-token log-probs of `targets` (N, T) from the hidden `states` (N, T, H) that predict them. Never builds the
    (N, T, vocab) log-softmax: the head runs on `chunk` real tokens at a time, checkpointed (memory flat in T)."""
    states, flat_targets = states[target_mask], targets[target_mask]  # (K, H), (K,): real response tokens only
    head, stop_id = model.get_output_embeddings(), DIAGNOSTICS.get("stop_id", -1)
    parts = [checkpoint(_chunk_logprob, states[s:s + chunk], flat_targets[s:s + chunk], head.weight, head.bias,
                        temperature, stop_id, use_reentrant=False)
             for s in range(0, states.shape[0], chunk)]
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (N, T)
    if parts and stop_id >= 0:  # from the same chunks: no extra forward
        DIAGNOSTICS.setdefault("parts", []).append((torch.cat([d for _, d in parts]), target_mask.sum(1)))
    return logp.masked_scatter(target_mask, torch.cat([lp for lp, _ in parts])) if parts else logp

def logprob_y_given_x(model, prompt_ids, response_ids, pad, temperature=1.0, chunk=256, share_prompt=True,
                      checkpointing=False):
    """log pi(y_t | x, y_<t) per response token (the standard RL space) -> (logp, mask), (N, T). Prompts left-padded,
    responses right-padded, positions from the mask. The samples of a prompt share one forward of it (its KV cache,
    repeated per sample; exact: x does not see y). checkpointing: the response pass under checkpointed_layers."""
    device = next(model.parameters()).device
    y, y_mask = right_pad(response_ids, pad, device)  # (N, T)
    rows = {}
    which = [rows.setdefault(tuple(p), len(rows)) for p in prompt_ids] if share_prompt else list(range(len(prompt_ids)))
    unique = [list(p) for p in rows] if share_prompt else prompt_ids
    x, x_mask = left_pad(unique, pad, device)  # (B, P), one row per distinct prompt
    idx = torch.tensor(which, device=device)
    prefix = model.base_model(input_ids=x, attention_mask=x_mask, position_ids=positions_from_mask(x_mask),
                              use_cache=True)
    # (B, ...) -> (N, ...) by index_select: the backward of the cache's own batch_select_indices (fancy indexing,
    # index_put with accumulate) adds in a thread-dependent order on CPU, and two runs would differ in the last bits
    cache_key = cache_arg(model)
    for layer in prefix[cache_key].layers:
        layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
    mask = torch.cat([x_mask[idx], y_mask.long()], 1)  # (N, P+T)
    positions = x_mask.sum(1)[idx, None] + torch.arange(y.shape[1], device=device)  # continue after the prompt
    with checkpointed_layers(model, checkpointing):  # the response pass only: it reads, never appends to, the cache
        hidden = model.base_model(input_ids=y, attention_mask=mask, position_ids=positions, use_cache=False,
                                  **{cache_key: read_only_cache(prefix[cache_key])}).last_hidden_state  # (N, T, H)
    # the last prompt state predicts y_0; the state of y_t predicts y_{t+1}
    states = torch.cat([prefix.last_hidden_state[idx, -1:], hidden[:, :-1]], 1)  # (N, T, H)
    return token_logprobs(model, states, y, y_mask, temperature, chunk), y_mask

def logprob_y(model, start_id, response_ids, pad, temperature=1.0, chunk=256, checkpointing=False):
    """log pi(y_t | <|im_start|>, y_<t): the pre-train space P(y). Input [<|im_start|>] + y, positions 0..|y|.
    -> (logp, mask), (N, T). checkpointing: the body's layers recompute in backward (checkpointed_layers)."""
    device = next(model.parameters()).device
    y, y_mask = right_pad(response_ids, pad, device)  # (N, T)
    start = torch.full((y.shape[0], 1), start_id, dtype=torch.long, device=device)
    ids = torch.cat([start, y], 1)  # (N, 1+T)
    mask = torch.cat([torch.ones_like(start), y_mask.long()], 1)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)  # 0..|y| (pads are masked)
    with checkpointed_layers(model, checkpointing):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state
    return token_logprobs(model, hidden[:, :-1], y, y_mask, temperature, chunk), y_mask  # state t predicts y_t

# ---- Advantages, sample masks (NSR / PSR), the clipped token-mean loss -------------------------------------
def group_advantages(rewards, group_size: int, use_std: bool):
    """A_i = r_i - mean_g r, divided by (std_g r + 1e-6) in P(y|x) space (GRPO) and not in P(y) space
    (official pretrain_norm_adv_by_std=False). std is unbiased (torch.std). rewards (N,) -> (N,)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # (B, G)
    adv = r - r.mean(1, keepdim=True)
    if use_std:
        adv = adv / (r.std(1, keepdim=True) + 1e-6)
    return adv.view(-1)

def sample_mask(adv, samples: str):
    """Which samples take part in the loss. NSR: A < 0 (wrong answers in groups with a right one);
    PSR: A > 0; all: every sample, A = 0 included (it adds tokens to the token-mean denominator)."""
    return {"neg": adv < 0, "pos": adv > 0, "all": torch.ones_like(adv, dtype=torch.bool)}[samples]

def ppo_clip_loss(logp, old_logp, adv, clip_low, clip_high, clip_dual):
    """Per-token PPO surrogate with dual clip (verl core_algos.compute_policy_loss). adv broadcasts (N, 1)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    dual = torch.minimum(loss, -adv * clip_dual)  # dual clip: bound the loss of A < 0 tokens
    return torch.where(adv < 0, dual, loss)

def token_mean_loss(per_token, mask, n_tokens):
    """Sum of per-token losses over the kept tokens / number of kept tokens of the WHOLE step, so
    micro-batches add up to exactly the one-batch loss."""
    return (per_token * mask).sum() / max(n_tokens, 1)

# ---- The phase schedule: what a step does, decided in one place --------------------------------------------
class Phase(NamedTuple):
    space: str      # "y" = P(y) (pre-train space), "y|x" = P(y|x) (standard RL)
    samples: str    # which samples take part: "neg" (NSR), "pos" (PSR) or "all"
    use_std: bool   # divide the advantage by the group std: GRPO yes, P(y) no (pretrain_norm_adv_by_std=False)
    coef: float     # scale of the loss: --prerl-coef in P(y) (pretrain_loss_coef), 1 in P(y|x)
    name: str       # "warmup" (the DSRL warm-up) or "rl"

def phase_for_step(mode: str, step: int, warmup_steps: int, prerl_coef: float = 0.01, warmup_space="y") -> Phase:
    """The phase of 1-based `step`. dsrl: NSR-PreRL for steps 1..W, GRPO from W+1 (official
    pretrain_loss_disable_step = W + 1); warmup_space "y|x": NSR-RL (the prompt kept) for steps 1..W instead.
    The other modes keep one phase for the whole run."""
    warm = mode == "dsrl" and step <= warmup_steps
    key = ("nsr-prerl" if warmup_space == "y" else "nsr-rl") if warm else "grpo" if mode == "dsrl" else mode
    space, samples = MODES[key]
    return Phase(space, samples, use_std=space == "y|x", coef=prerl_coef if space == "y" else 1.0,
                 name="warmup" if warm else "rl")

# ---- One update: loss in the phase's space, backward over micro-batches, AdamW step ------------------------
class Batch(NamedTuple):
    """One step's rollouts, prompt-major: sample i belongs to prompt i // G."""
    prompt_ids: list    # N token lists (each prompt repeated G times)
    response_ids: list  # N token lists
    adv: torch.Tensor   # (N,) advantages
    keep: torch.Tensor  # (N,) bool: the phase's sample mask

class UpdateStats(NamedTuple):
    loss: float         # the step's loss (coef * token-mean)
    n_used: int         # samples whose forward/backward ran (kept and A != 0)
    tokens_used: int    # their tokens
    loss_tokens: int    # token-mean denominator: all tokens of the kept samples
    grad_norm: float
    skipped: bool       # non-finite loss or gradient: no update
    diagnostics: dict   # the official actor's diagnostics of the step (step_diagnostics)

def policy_loss_backward(model, batch: Batch, phase: Phase, args, start_id, pad, stop_id=-1):
    """Forward + backward of coef * token_mean(PPO loss) in the phase's space over length-sorted micro-batches, for
    the samples that can change the gradient (kept, A != 0). -> (loss, samples run, denominator, diagnostics)."""
    ys_all, adv = batch.response_ids, batch.adv
    kept = [i for i in range(len(ys_all)) if batch.keep[i]]
    n_tokens = sum(len(ys_all[i]) for i in kept)  # token-mean denominator
    # Length-sorted micro-batches pad little; in P(y|x) a prompt's samples stay together to share its forward.
    by_length = (lambda i: len(ys_all[i])) if phase.space == "y" else (lambda i: (batch.prompt_ids[i], len(ys_all[i])))
    active = sorted((i for i in kept if adv[i] != 0), key=by_length)
    total, device, dtype = 0.0, next(model.parameters()).device, resolve_dtype(args.dtype, args.device)
    ckpt = use_checkpointing(args, device.type)
    DIAGNOSTICS.update(stop_id=stop_id, parts=[])  # token_logprobs adds each pass's diagnostics
    for s in range(0, len(active), args.micro_batch_size):
        mb = active[s:s + args.micro_batch_size]
        ys = [ys_all[i] for i in mb]
        with autocast(device, dtype):
            if phase.space == "y":
                logp, mask = logprob_y(model, start_id, ys, pad, args.temperature, args.logprob_chunk, ckpt)
            else:
                logp, mask = logprob_y_given_x(model, [batch.prompt_ids[i] for i in mb], ys, pad, args.temperature,
                                               args.logprob_chunk, checkpointing=ckpt)
        a = adv[mb].to(device)[:, None]  # (n, 1)
        # One update per batch: old log-probs equal the current ones, so the ratio is exactly 1.
        per_token = ppo_clip_loss(logp, logp.detach(), a, args.clip_low, args.clip_high, args.clip_dual)
        loss = phase.coef * token_mean_loss(per_token, mask, n_tokens)
        loss.backward()
        total += loss.item()
    diagnostics = step_diagnostics(DIAGNOSTICS.pop("parts"))
    DIAGNOSTICS.clear()
    return total, active, n_tokens, diagnostics

DIAGNOSTIC_KEYS = ("entropy", "logprob_mean", "prob_mean", *(f"top{k}_prob_mean" for k in (1, 2, 3)), "eos_prob_mean")

def step_diagnostics(parts):
    """The official actor's diagnostics of the samples a step ran, in its space: the entropy a token-mean, the rest a
    mean over responses of token-means (official mask_and_mean). The PPO ratio is exactly 1 (one update per batch),
    so the clip fractions and the approximate KL are 0 by construction: logged as such."""
    values = dict.fromkeys(DIAGNOSTIC_KEYS, float("nan"))  # no sample ran
    if parts:
        per_token, lengths = (torch.cat(x) for x in zip(*parts))  # (K, 7), (N,)
        per_seq = torch.stack([t.mean(0) for t in per_token.split(lengths[lengths > 0].tolist())]).mean(0)
        values = dict(zip(DIAGNOSTIC_KEYS, [per_token[:, 0].mean().item()] + per_seq[1:].tolist()))
    return {**values, "pg_clipfrac": 0.0, "pg_clipfrac_lower": 0.0, "ppo_kl": 0.0}

def optimizer_step(model, optimizer, grad_clip):
    """Clip, step, zero. A non-finite grad norm skips the update (official behaviour) -> (grad_norm, skipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a step with no active samples still steps AdamW (momentum, weight decay), as officially
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    if math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, not math.isfinite(grad_norm)

def policy_update(model, optimizer, batch: Batch, phase: Phase, args, start_id, pad, stop_id=-1) -> UpdateStats:
    """One optimizer step of the phase's loss. A non-finite loss or gradient skips the update."""
    loss, active, loss_tokens, diagnostics = policy_loss_backward(model, batch, phase, args, start_id, pad, stop_id)
    grad_norm, skipped = optimizer_step(model, optimizer, args.grad_clip) if math.isfinite(loss) else (math.nan, True)
    model.zero_grad(set_to_none=True)  # a skipped step leaves no gradient behind
    tokens_used = sum(len(batch.response_ids[i]) for i in active)
    return UpdateStats(loss, len(active), tokens_used, loss_tokens, grad_norm, skipped, diagnostics)

# ---- The training loop -------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds between steps (built by start_run, fresh or from a checkpoint)."""
    model: object       # fp32 master weights
    gen_model: object   # the sampler: the model itself (fp32) or its bf16 copy, re-synced after each update
    tokenizer: object
    optimizer: object   # AdamW
    examples: list      # {"messages", "answer"} rows of the training set
    start_id: int       # <|im_start|>: the token that stands in for the prompt in P(y)
    pad: int
    dtype: object       # compute dtype (autocast)
    first_step: int
    bad_in_row: int     # non-finite steps in a row (stop at --max-bad-steps)
    gen_batch_size: int = 0  # sequences per generate call, as the memory plan resolved --gen-batch-size
    alarms: dict = field(default_factory=dict)  # alarm -> steps in a row it held (raise_alarms)

def rollout(run: Run, args, step: int):
    """Steps 1-2 of the loop: the step's prompts, G samples each from P(y|x), and their rewards."""
    idx = batch_indices(len(run.examples), args.seed, step, args.prompts_per_step)
    batch = [run.examples[i] for i in idx]
    prompt_ids = [build_prompt(run.tokenizer, ex["messages"], args.max_prompt_tokens) for ex in batch]
    responses, truncated = sample_responses(run.gen_model, run.tokenizer, prompt_ids, args.group_size,
                                            args.max_new_tokens, args.temperature, args.top_p, run.gen_batch_size,
                                            dtype=run.dtype, kv_cache=args.kv_cache)
    texts = run.tokenizer.batch_decode(responses, skip_special_tokens=True)
    golds = [ex["answer"] for ex in batch for _ in range(args.group_size)]
    rewards, outcomes = score(texts, golds, args.reward)
    return dict(idx=idx, prompt_ids=[p for p in prompt_ids for _ in range(args.group_size)], responses=responses,
                truncated=truncated, texts=texts, golds=golds, rewards=rewards, outcomes=outcomes)

def train(args: Args, resume=None):
    from tqdm import tqdm
    import eval as evaluator  # --eval-every; imported here, not at the top, because eval.py imports dsrl.py
    run = start_run(args, resume)
    trackers = evaluator.open_trackers(args, run.first_step)  # --report-to: live curves
    if args.eval_every and args.eval_before_train and run.first_step == 1:  # the curve's starting point: step 0
        log_row(args, trackers, {"step": 0, **evaluator.metrics_for_training(run.gen_model, run.tokenizer, args,
                                                                             run.dtype, run.gen_batch_size)})
    bar = tqdm(range(run.first_step, args.steps + 1), initial=run.first_step - 1, total=args.steps, dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        STEP_START.update(run=run, args=args, step=step, rng=rng_state(), phase="sampling")  # see out_of_memory
        phase = phase_for_step(args.mode, step, args.warmup_steps, args.prerl_coef, args.warmup_space)
        if args.mode == "dsrl" and step == args.warmup_steps + 1:
            tqdm.write(f"=== step {step}: warm-up over, policy reincarnation: GRPO in P(y|x) from here ===")
        # 1-2. sample G responses per prompt from P(y|x), and reward them
        ro = rollout(run, args, step)
        t_gen = time.time() - t0
        # 3. advantages and the samples that take part
        adv = group_advantages(ro["rewards"], args.group_size, phase.use_std)  # (N,)
        keep = sample_mask(adv, phase.samples)
        # 4. loss in the phase's space, backward, update; then the sampler follows the new weights
        STEP_START["phase"] = "loss"
        batch = Batch(ro["prompt_ids"], ro["responses"], adv, keep)
        stats = policy_update(run.model, run.optimizer, batch, phase, args, run.start_id, run.pad,
                              token_id(run.tokenizer, STOP_TOKEN))
        STEP_START.clear()
        if not stats.skipped:
            sync_generation_copy(run.gen_model, run.model)
        run.bad_in_row = run.bad_in_row + 1 if stats.skipped else 0
        # 5. log
        row = metrics_row(step, phase, ro, adv, stats, run.optimizer, t_gen, time.time() - t0)
        if args.eval_every and step % args.eval_every == 0:
            row.update(evaluator.metrics_for_training(run.gen_model, run.tokenizer, args, run.dtype,
                                                      run.gen_batch_size))
        warnings = raise_alarms(row, run.alarms, len(ro["texts"]))
        samples = sample_rows(step, ro, adv, keep, args.group_size)
        shown = samples[::len(samples) // 4 or 1] if step == 1 or step % args.save_every == 0 else ()  # now and then
        log_row(args, trackers, row, shown)
        append_jsonl(os.path.join(args.output_dir, "samples.jsonl"), samples)
        tqdm.write("\n".join([console_line(row)] + warnings))
        # 6. checkpoint, stop requests, runaway NaN
        stop, runaway = STOP_REQUEST["signal"], run.bad_in_row >= args.max_bad_steps
        if step % args.save_every == 0 or step == args.steps or stop or runaway:
            save_checkpoint(args.output_dir, step, run, args)
        if runaway or stop:
            bar.close(), evaluator.close_trackers(trackers)
            print(f"error: {run.bad_in_row} non-finite steps in a row at step {step}; no NaN was written, last "
                  f"weights in {args.output_dir}/checkpoint-{step}; lower --lr or check the data" if runaway else
                  f"stopped by {stop} after step {step}; continue with: python dsrl.py --output-dir "
                  f"{args.output_dir} --resume", file=sys.stderr)
            return 3 if runaway else 0
    bar.close(), evaluator.close_trackers(trackers)
    return 0

ALARMS = {  # metrics key: (a step's condition, the likely cause and the fix); warned when it holds 3 steps in a row
    "alarm_truncated": (lambda r, n: r["truncated_frac"] >= 0.9, "nearly every response hits --max-new-tokens and "
                        "gets reward 0: raise --max-new-tokens"),
    "alarm_uniform": (lambda r, n: r["n_pos"] + r["n_neg"] == 0, "every group is uniform (all right or all wrong): "
                      "no gradient; use data at the model's level or a larger --group-size"),
    "alarm_no_box": (lambda r, n: r["reward_no_box"] >= 0.9 * n, "nearly every response lacks a \\boxed{} answer: "
                     "check the chat template and the prompts of --dataset")}

def raise_alarms(row, streaks, n_responses):
    """Silent failures announced: row[key] counts the steps in a row its condition held. -> warnings to print."""
    for key, (holds, _) in ALARMS.items():
        row[key] = streaks[key] = streaks.get(key, 0) + 1 if holds(row, n_responses) else 0
    return [f"warning: {message} (3 steps in a row)" for key, (_, message) in ALARMS.items() if row[key] == 3]

def metrics_row(step, phase: Phase, ro, adv, stats: UpdateStats, optimizer, t_gen, t_step):
    """One line of metrics.jsonl (keys listed in README, "Outputs")."""
    r = torch.tensor(ro["rewards"]).view(len(ro["idx"]), -1)  # (B, G)
    lengths = [len(y) for y in ro["responses"]]
    return {"step": step, "phase": phase.name, "space": "P(y)" if phase.space == "y" else "P(y|x)",
            "samples": phase.samples, "reward_mean": r.mean().item(), "n_pos": int((adv > 0).sum()),
            "n_neg": int((adv < 0).sum()), "n_used": stats.n_used, "tokens_used": stats.tokens_used,
            "loss_tokens": stats.loss_tokens, "solved_all": int((r.min(1).values == 1).sum()),
            "solved_none": int((r.max(1).values == 0).sum()), "loss": stats.loss, "grad_norm": stats.grad_norm,
            "skipped": int(stats.skipped), "response_len_mean": sum(lengths) / len(lengths),
            "truncated_frac": sum(ro["truncated"]) / len(ro["truncated"]), "gen_tokens": sum(lengths),
            **{f"reward_{k}": v for k, v in ro["outcomes"].items()},
            **stats.diagnostics, "lr": optimizer.param_groups[0]["lr"], "time_gen_s": t_gen, "time_step_s": t_step}

def sample_rows(step, ro, adv, keep, group_size):
    """Lines of samples.jsonl: every response of the step with its reward, advantage and token count."""
    return [{"step": step, "prompt_index": ro["idx"][i // group_size], "response": ro["texts"][i],
             "gold": ro["golds"][i], "reward": ro["rewards"][i], "advantage": adv[i].item(),
             "used_in_loss": bool(keep[i]), "truncated": ro["truncated"][i],
             "response_tokens": len(ro["responses"][i])} for i in range(len(ro["texts"]))]

def console_line(row):
    return (f"step {row['step']:4d} {row['space']:6s} {row['samples']:3s} reward {row['reward_mean']:.3f} "
            f"all/none {row['solved_all']}/{row['solved_none']} used {row['n_used']:3d} loss {row['loss']:+.5f} "
            f"gnorm {row['grad_norm']:.3f}{' SKIPPED' if row['skipped'] else ''} len {row['response_len_mean']:.0f} "
            f"gen {row['time_gen_s']:.1f}s step {row['time_step_s']:.1f}s")

# ---- Model, checkpoints, resume, logs ----------------------------------------------------------------------
def load_model_and_tokenizer(name_or_path: str, device: str = "cpu"):
    """fp32 master weights (an AdamW update at lr 1e-6 vanishes in bf16 weights); compute runs in autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging
    hf_logging.disable_progress_bar()  # one progress bar (ours) on the console
    local = os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local and not os.path.isdir(name_or_path):
        raise UsageError(f"model path not found: {name_or_path} (give a model directory or a hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    except Exception as e:
        raise UsageError(f"cannot load a causal LM from '{name_or_path}': {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''} (check the path or hub id)")
    if not tokenizer.chat_template:
        raise UsageError(f"tokenizer of {name_or_path} has no chat template; DSRL builds chat prompts")
    tokenizer.padding_side = "left"
    return model.to(device), tokenizer

def generation_copy(model, dtype):
    """The sampler: the model itself in fp32, or a copy in low precision (re-synced after each update)."""
    gen = model if dtype == torch.float32 else copy.deepcopy(model).eval()
    for p in gen.parameters() if gen is not model else ():  # buffers stay as the master's: RoPE's inv_freq in fp32
        p.data = p.data.to(dtype)
    return gen

@torch.no_grad()
def sync_generation_copy(gen_model, model):
    if gen_model is not model:
        for p_gen, p in zip(gen_model.parameters(), model.parameters()):
            p_gen.copy_(p)

def prepare_output_dir(args, resume_path):
    """Check that --output-dir is writable and does not hold another run's checkpoints."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()  # fail now, not after loading the model
    except OSError as e:
        raise UsageError(f"output dir {args.output_dir} is not writable ({e.strerror}); choose another --output-dir")
    if not resume_path and list_checkpoints(args.output_dir):
        raise UsageError(f"{args.output_dir} already holds checkpoints of a run; add --resume to continue it "
                         "or choose a new --output-dir")

def start_run(args: Args, resume=None) -> Run:
    """Load data and model, seed, build AdamW; from a checkpoint (path, state), restore optimizer, RNG and step."""
    check_args(args)
    device, (resume_path, state) = resolve_device(args.device), resume or (None, None)
    dtype, ckpt = resolve_dtype(args.dtype, device), use_checkpointing(args, device)
    plan = scale_call(scale.plan_run, args, resume_path or args.model, device, dtype, ckpt)  # printed; --plan exits
    prepare_output_dir(args, resume_path)
    if args.deterministic:  # before CUDA starts: cuBLAS needs a fixed workspace to repeat its sums
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    examples, n_malformed = load_problems(args.dataset)
    model, tokenizer = load_model_and_tokenizer(resume_path or args.model, device)
    start_id, pad = token_id(tokenizer, START_TOKEN), pad_id(tokenizer)
    random.seed(args.seed), torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    run = Run(model, None, tokenizer, optimizer, examples, start_id, pad, dtype, 1, 0, plan["gen_batch_size"])
    if resume_path:
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])  # the sampler's and the data's random streams continue exactly
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        run.first_step, run.bad_in_row = state["step"] + 1, state.get("bad_in_row", 0)
        run.alarms = state.get("alarms", {})
        print(f"resumed from {resume_path} at step {state['step']}", file=sys.stderr)
    for name in ("metrics.jsonl", "samples.jsonl"):  # cut back to the checkpoint; a fresh run starts them empty
        truncate_jsonl(os.path.join(args.output_dir, name), state["step"] if resume_path else -1)
    with open(os.path.join(args.output_dir, "config.json"), "w") as fh:
        json.dump({**dataclasses.asdict(args), "resolved_device": device, "resolved_dtype": str(dtype),
                   "n_examples": len(examples), "n_malformed_rows": n_malformed}, fh, indent=2)
    if n_malformed:
        print(f"warning: skipped {n_malformed} malformed rows of {args.dataset}", file=sys.stderr)
    run.gen_model = generation_copy(model, dtype)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    return run

CHECKPOINT_FILES = ("config.json", "trainer_state.pt")

def rng_state():  # Python's, torch's and CUDA's random state: a checkpoint's, or a step's start (out_of_memory)
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

def save_checkpoint(output_dir, step, run: Run, args, rng=None):
    """checkpoint-N/: HF weights + tokenizer (from_pretrained loads it) and trainer_state.pt, written to a temporary
    folder and renamed (a kill never leaves a complete-looking partial one); a failed write raises UsageError."""
    final, tmp = (os.path.join(output_dir, f"{prefix}checkpoint-{step}") for prefix in ("", ".tmp-"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        run.model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": run.optimizer.state_dict(), "rng": rng or rng_state(),
                    "args": dataclasses.asdict(args), "bad_in_row": run.bad_in_row, "alarms": run.alarms},
                   os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint-{step} ({e.strerror or e}); free disk space and "
                         "resume with --resume (the previous checkpoint is intact)")
    if args.save_total_limit:
        for old in list_checkpoints(output_dir)[:-args.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final

def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first. Partial ones (a kill during saving) are skipped with a warning."""
    found = []
    for path in [p for prefix in ("", ".tmp-") for p in glob.glob(os.path.join(output_dir, prefix + "checkpoint-*"))]:
        complete = os.path.basename(path).startswith("checkpoint-") and all(
            os.path.exists(os.path.join(path, f)) for f in CHECKPOINT_FILES)
        if not complete:
            print(f"warning: ignoring incomplete checkpoint {path}", file=sys.stderr)
        elif re.fullmatch(r"checkpoint-\d+", os.path.basename(path)):
            found.append(path)
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))

def truncate_jsonl(path, last_step):
    """Drop lines of steps after `last_step` (a run resumed from checkpoint-N repeats steps N+1..)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip() and _line_step(ln) <= last_step]
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.replace(path + ".tmp", path)

def _line_step(line):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 10 ** 12  # a torn last line from a kill: dropped

def append_jsonl(path, rows):
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

def log_row(args, trackers, row, samples=()):
    """A row to metrics.jsonl, the record, and to --report-to's trackers (eval.py's track: live curves)."""
    append_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), [row])
    if trackers:
        import eval as evaluator  # here, not at the top: eval.py imports dsrl.py
        evaluator.track(trackers, row, samples)

def read_checkpoint(path):
    """trainer_state of a checkpoint whose files read back whole, or None (truncated or corrupt: a disk fault)."""
    try:
        for weights in glob.glob(os.path.join(path, "*.safetensors")):
            safetensors.safe_open(weights, "pt").keys()  # checks that the file covers every tensor of its header
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        return state if {"step", "optimizer", "rng", "args"} <= set(state) else None
    except Exception:
        return None

def resolve_resume(args: Args, explicit: set):
    """The newest readable checkpoint and its run's settings; changes that break resuming refused. -> (args, resume)"""
    if not args.resume:
        return args, None
    if args.resume == "latest":
        candidates = list_checkpoints(args.output_dir)[::-1]
    else:
        candidates = [args.resume.rstrip("/")]
        if not all(os.path.exists(os.path.join(candidates[0], f)) for f in CHECKPOINT_FILES):
            raise UsageError(f"--resume {candidates[0]}: not a complete checkpoint folder (needs "
                             f"{', '.join(CHECKPOINT_FILES)})")
        if "output_dir" not in explicit:
            args.output_dir = os.path.dirname(os.path.abspath(candidates[0]))
    for path in candidates:
        if (state := read_checkpoint(path)) is not None:
            break
        print(f"warning: {path} cannot be read (truncated or corrupt); trying an older checkpoint", file=sys.stderr)
    else:
        raise UsageError(f"--resume: no readable checkpoint in {args.output_dir} (start without --resume)")
    saved = state["args"]
    clash = sorted(k for k in explicit - RESUMABLE_CHANGES if k in saved and saved[k] != getattr(args, k))
    if clash:
        raise UsageError(f"--resume: {', '.join(clash)} differ from the checkpoint's run "
                         f"({', '.join(f'{k}={saved[k]!r}' for k in clash)}); drop these flags or use a new "
                         "--output-dir")
    for k, v in saved.items():  # unspecified flags take the run's values
        if k not in explicit and k not in ("resume", "output_dir") and hasattr(args, k):
            setattr(args, k, v)
    if state["step"] >= args.steps:  # a finished run: say so before loading anything
        raise UsageError(f"--resume: {path} is step {state['step']} of --steps {args.steps}; give a larger --steps")
    return args, (path, state)

# ---- Main --------------------------------------------------------------------------------------------------
STOP_REQUEST = {"signal": None}
STEP_START = {}  # the step under way while it samples or computes its loss: what out_of_memory saves

def _request_stop(signum, frame):
    if STOP_REQUEST["signal"] is not None:  # second Ctrl-C: give up at once
        raise KeyboardInterrupt
    STOP_REQUEST["signal"] = signal.Signals(signum).name
    print(f"\n{STOP_REQUEST['signal']}: finishing this step, saving a checkpoint, then exiting", file=sys.stderr)

def out_of_memory(run, args, step, rng, phase):
    """Out of GPU memory in a step's sampling or loss: the weights and AdamW are still those of step - 1. Checkpoint
    them with the random state of the step's start (a resume redoes it exactly), name flags the plan fits, exit 2."""
    save_checkpoint(args.output_dir, step - 1, run, args, rng)
    flags = scale.flags_after_out_of_memory(run.model.config, args, run.gen_batch_size, phase, run.model.device.type,
                                            run.dtype, use_checkpointing(args, run.model.device.type))
    print(f"error: out of GPU memory in the {phase} of step {step}; saved checkpoint-{step - 1}; " + (
        f"continue with: python dsrl.py --output-dir {args.output_dir} --resume {flags}" if flags else
        "it is at its smallest setting: start anew with a smaller --model or --max-new-tokens"), file=sys.stderr)
    return 2

def main(argv=None):
    args, explicit = parse_args(argv)
    try:
        if args.print_verl_command:  # nothing is loaded: the same experiment on the official multi-GPU engine
            print(scale_call(scale.verl_command, args, MODES, DEFAULT_DATASET))
            return 0
        args, resume = resolve_resume(args, explicit)
        return train(args, resume)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError if STEP_START else ():  # in a step's sampling or loss: nothing is lost
        return out_of_memory(**STEP_START)
    except KeyboardInterrupt:  # Ctrl-C while loading, or a second one: stop now (checkpoints are written atomically)
        print("\ninterrupted; " + ("continue from the last checkpoint with --resume" if list_checkpoints(
            args.output_dir) else "no checkpoint was written yet: start the run again"), file=sys.stderr)
        return 130

if __name__ == "__main__":  # run the importable module: eval.py's `import dsrl` (--eval-every) then shares it
    import dsrl
    sys.exit(dsrl.main())
