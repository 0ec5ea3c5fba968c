"""dsrl.py - Dual Space RL (DSRL) for math reasoning, in one file.

Paper:    From P(y|x) to P(y): Investigating Reinforcement Learning in Pre-train Space
          (Tan et al., 2026, arXiv 2604.14142).
Official: github.com/Trae1ounG/Pretrain_Space_RLVR (a verl fork). Semantics reproduced here are
          the ones of that code (ray_trainer.py, dp_actor.py, core_algos.py, run_code/DSRL_qwen3-4b.sh).

The idea in four lines. Sample G answers per problem from the policy P(y|x) and score them (0/1).
NSR-PreRL: push DOWN log P(y) = sum_t log pi(y_t | <|im_start|>, y_<t) of the wrong answers, i.e. the
gradient goes through the model *without the prompt* ("pre-train space"). DSRL: do that for a short
warm-up, then hand the weights over to ordinary GRPO in P(y|x) ("policy reincarnation").

Run:   python dsrl.py --model Qwen/Qwen3-0.6B                  (DSRL, one GPU)
       python dsrl.py --model PATH --mode grpo --steps 100     (any of the six modes)
       python dsrl.py --output-dir runs/x --resume             (continue a stopped run)

Departures from the official code (each also in README.md, "Departures"):
 1. Token-mean over ALL kept tokens of the step. Official: token-mean per micro-batch, micro-batches
    weighted by their share of sequences. Ours is the clean definition and makes micro-batching exact.
 2. Work that cannot change the gradient is skipped: no conditional forward in P(y)-only steps, no P(y)
    forward in GRPO steps, no forward for masked or zero-advantage samples (their tokens still count in
    the GRPO denominator, as in the official loss). Official computes all of them and multiplies by 0.
 3. No separate old-log-prob pass: with one update per batch the PPO ratio is exactly 1, so
    old_logp = logp.detach(). The clipped (and dual-clipped) form is kept for the general case.
 4. Reward: by default an equivalence checker (strings, then exact numbers, then bounded sympy) that
    accepts everything the official Hendrycks string scorer accepts and more (0.50 = 1/2).
    `--reward official` gives the official string scorer bit for bit.
 5. Sampling with Hugging Face `generate` (official: vLLM), from a bf16 copy of the fp32 master
    weights that is re-synced after every update (official: FSDP fp32 master + bf16 rollout engine).
 6. Default sizes for one GPU: Qwen3-0.6B, 16 prompts x 8 samples, 1,024 new tokens
    (official: Qwen3-4B, 128 x 8, 8,192). Loss, clip and optimizer settings are the official ones.
 7. `--warmup-steps W` counts warm-up UPDATES: steps 1..W use P(y), steps W+1.. use P(y|x).
    The official `pretrain_loss_disable_step=D` runs steps 1..D-1 in P(y), so W = D - 1 (default 19).
"""

import argparse
import dataclasses
import functools
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from fractions import Fraction

import mpmath  # numeric equality in the reward; installed with sympy

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
START_TOKEN = "<|im_start|>"   # the one token that stands in for the prompt in P(y) space
STOP_TOKEN = "<|im_end|>"      # chat end of turn: Qwen's EOS for chat responses
DEFAULT_DATASET = "DigitalLearningGmbH/MATH-lighteval"
MODES = {  # mode -> list of (space, samples) phases; see phase_for_step
    "dsrl": "NSR-PreRL warm-up (P(y), wrong answers), then GRPO (P(y|x), all samples)",
    "grpo": "P(y|x), all samples (baseline)",
    "nsr-prerl": "P(y), negative samples only (the paper's key mechanism)",
    "psr-prerl": "P(y), positive samples only",
    "nsr-rl": "P(y|x), negative samples only (ablation: same pruning, prompt kept)",
    "psr-rl": "P(y|x), positive samples only (ablation)",
}


# ----------------------------------------------------------------------------------------------------
# Settings: one source of truth. The help line names the official value where ours differs.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = field(default="Qwen/Qwen3-0.6B", metadata={"help": "hub id or local path of a causal LM (official: Qwen3-4B)"})
    dataset: str = field(default=DEFAULT_DATASET, metadata={"help": "hub id or local .parquet/.jsonl (verl format, problem+answer or problem+solution)"})
    mode: str = field(default="dsrl", metadata={"help": "one of: " + ", ".join(MODES)})
    warmup_steps: int = field(default=19, metadata={"help": "dsrl: number of NSR-PreRL updates before GRPO (official pretrain_loss_disable_step=20 -> 19)"})
    prerl_coef: float = field(default=0.01, metadata={"help": "scale of the P(y) loss (official pretrain_loss_coef)"})
    steps: int = field(default=348, metadata={"help": "optimizer steps in total (official: 348 = 6 epochs of 128 prompts)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step (official: 128)"})
    group_size: int = field(default=8, metadata={"help": "responses sampled per prompt, G >= 2"})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "prompts longer than this are cut from the left"})
    max_new_tokens: int = field(default=1024, metadata={"help": "response length limit (official: 8192)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; log-probs use the same one"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate, constant"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip epsilon below 1"})
    clip_high: float = field(default=0.2, metadata={"help": "PPO clip epsilon above 1 (official GRPO baseline script: 0.28)"})
    clip_dual: float = field(default=10.0, metadata={"help": "dual-clip constant c for negative advantages"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward (gradient accumulation, exact)"})
    gen_batch_size: int = field(default=0, metadata={"help": "sequences per generate call (rounded down to whole groups), 0 = all at once"})
    kv_cache: str = field(default="dynamic", metadata={"help": "generate's KV cache: dynamic, static (compiled decode on GPU) or compile (static + torch.compile on any device)"})
    logprob_chunk: int = field(default=256, metadata={"help": "tokens per chunk of the vocabulary projection (memory ~ 4 x chunk x vocab x 4 bytes)"})
    reward: str = field(default="math", metadata={"help": "math (equivalence checker) or official (exact official string scorer)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, sampling and init of everything random"})
    output_dir: str = field(default="runs/dsrl", metadata={"help": "where config, metrics, samples and checkpoints go"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and always at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep only the last N checkpoints, 0 = keep all"})
    resume: str = field(default="", metadata={"help": "continue from the latest checkpoint in --output-dir (bare flag) or from a checkpoint path"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many non-finite steps in a row"})
    eval_every: int = field(default=0, metadata={"help": "run eval.py accuracy every N steps, 0 = never (official: 5)"})
    eval_benchmarks: str = field(default="aime24,aime25,amc23", metadata={"help": "benchmarks for --eval-every (names or files)"})
    eval_k: int = field(default=4, metadata={"help": "samples per problem for --eval-every (official: 20)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32; weights stay fp32"})


# Keys that may change between a run and its resumption without changing what the run computes.
RESUMABLE_CHANGES = {"steps", "output_dir", "resume", "save_every", "save_total_limit", "device", "micro_batch_size",
                     "gen_batch_size", "kv_cache", "logprob_chunk", "max_bad_steps", "eval_every", "eval_benchmarks", "eval_k"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""


def build_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(description="Dual Space RL (DSRL) trainer: " + MODES["dsrl"],
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)
    for f in fields(Args):
        kw = {"help": f.metadata["help"] + ("" if suppress_defaults else f" (default: {f.default})")}
        if not suppress_defaults:
            kw["default"] = f.default
        if f.name == "resume":
            kw.update(nargs="?", const="latest")
        elif f.name == "mode":
            kw.update(choices=list(MODES))
        elif f.name == "reward":
            kw.update(choices=["math", "official"])
        elif f.name == "kv_cache":
            kw.update(choices=["dynamic", "static", "compile"])
        elif f.name == "dtype":
            kw.update(choices=["auto", "bfloat16", "float32"])
        else:
            kw["type"] = type(f.default)
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def parse_args(argv=None):
    """Returns (Args, set of keys given explicitly on the command line)."""
    args = Args(**vars(build_parser().parse_args(argv)))
    explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    return args, explicit


def check_args(a: Args):
    checks = [
        (a.group_size >= 2, f"--group-size {a.group_size}: needs >= 2 (with one sample every advantage is 0)"),
        (a.steps >= 1, f"--steps {a.steps}: needs >= 1"),
        (a.prompts_per_step >= 1, f"--prompts-per-step {a.prompts_per_step}: needs >= 1"),
        (a.warmup_steps >= 0 and (a.mode != "dsrl" or a.warmup_steps <= a.steps),
         f"--warmup-steps {a.warmup_steps}: must be between 0 and --steps {a.steps}"),
        (a.lr > 0, f"--lr {a.lr}: must be > 0"),
        (a.weight_decay >= 0, f"--weight-decay {a.weight_decay}: must be >= 0"),
        (a.prerl_coef > 0, f"--prerl-coef {a.prerl_coef}: must be > 0"),
        (a.temperature > 0, f"--temperature {a.temperature}: must be > 0"),
        (0 < a.top_p <= 1, f"--top-p {a.top_p}: must be in (0, 1]"),
        (a.max_new_tokens >= 1 and a.max_prompt_tokens >= 1, "--max-new-tokens and --max-prompt-tokens must be >= 1"),
        (a.clip_low > 0 and a.clip_high > 0 and a.clip_dual > 1, "clip epsilons must be > 0 and --clip-dual > 1"),
        (a.grad_clip > 0, f"--grad-clip {a.grad_clip}: must be > 0"),
        (a.micro_batch_size >= 1 and a.gen_batch_size >= 0 and a.logprob_chunk >= 1, "batch and chunk sizes must be >= 1"),
        (a.save_every >= 1 and a.save_total_limit >= 0, "--save-every must be >= 1 and --save-total-limit >= 0"),
        (a.max_bad_steps >= 1 and a.eval_every >= 0 and a.eval_k >= 1, "--max-bad-steps and --eval-k must be >= 1, --eval-every >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# ----------------------------------------------------------------------------------------------------
# Data and the chat prompt
# ----------------------------------------------------------------------------------------------------
def read_rows(source: str, split: str = "train") -> list:
    """Rows of a local .parquet/.jsonl file, or of a hub dataset split."""
    is_file = source.endswith((".parquet", ".jsonl", ".json")) or os.sep in source and os.path.exists(source)
    if is_file:
        if not os.path.isfile(source):
            raise UsageError(f"dataset file not found: {source} (give an existing .parquet/.jsonl file or a hub id)")
        try:
            if source.endswith(".parquet"):
                import pyarrow.parquet as pq  # comes with `datasets`
                return pq.read_table(source).to_pylist()
            rows = []
            with open(source, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            rows.append({"__malformed__": f"line {n}"})
            return rows
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"cannot read dataset file {source}: {type(e).__name__}: {str(e)[:200]} (is it a valid parquet/jsonl file?)")
    try:
        import datasets
        return datasets.load_dataset(source, split=split).to_list()
    except Exception as e:
        raise UsageError(f"cannot load dataset '{source}' from the hub ({type(e).__name__}); "
                         "check the id or give a local .parquet/.jsonl file")


def row_to_example(row: dict):
    """One row -> {"messages": chat, "answer": gold}, or None if the row is malformed.
    Accepted: the official verl format (prompt = chat messages, reward_model.ground_truth),
    problem + answer, problem + solution (answer = last \\boxed{} of the solution)."""
    if isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
        messages = [m for m in row["prompt"] if isinstance(m, dict) and m.get("content")]
        gold = row["reward_model"].get("ground_truth")
    elif "problem" in row and ("answer" in row or "solution" in row):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["problem"]}]
        gold = row["answer"] if "answer" in row else last_boxed(str(row.get("solution") or ""))
    else:
        return None
    if not messages or not all(isinstance(m.get("content"), str) for m in messages) or messages[-1].get("role") != "user":
        return None
    if gold is None or not str(gold).strip():
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
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_tokens:]


@functools.lru_cache(maxsize=2)
def data_order(n_examples: int, seed: int, epoch: int) -> list:
    """A fixed permutation per epoch: position in the data is a function of (seed, step) alone,
    so resuming needs no sampler state."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_examples, generator=g).tolist()


def batch_indices(n_examples: int, seed: int, step: int, batch: int) -> list:
    """Dataset indices of the prompts of optimizer step `step` (1-based); epochs roll over."""
    start = (step - 1) * batch
    out = []
    for pos in range(start, start + batch):
        epoch, offset = divmod(pos, n_examples)
        out.append(data_order(n_examples, seed, epoch)[offset])
    return out


# ----------------------------------------------------------------------------------------------------
# Reward: math_reward(response, gold) -> 1.0 / 0.0
# ----------------------------------------------------------------------------------------------------
# Answer verifier (reward function) for DSRL.
#
# Public API: last_boxed, strip_string, official_reward, reward_outcome, math_reward.
#
# Design (why it is safe and fast):
# * The official verl/Hendrycks string scorer runs first; whatever it accepts we accept.
# * Otherwise the boxed answer is cleaned (units, \\text, \\left, degrees, \\$ ...), split into
# structure (matrix / set / interval-or-tuple / list / relation / scalar) and scalars are
# parsed by a small recursive-descent LaTeX parser into a tuple AST.  Nothing is ever
# eval'd or sympified.
# * Scalars are compared exactly with fractions.Fraction when both are rational, otherwise
# numerically with mpmath (a hard dependency of sympy) at 60 digits, at several
# deterministic points for free variables.  A rounded decimal never matches an
# irrational at 1e-40 relative tolerance, while true identities match to ~1e-55.
# * Time bound: inputs are bounded BEFORE any maths (answer length, token count, nesting
# depth, literal digit count, Fraction bit size, mpmath magnitude checked after every
# operation and before every power), and a cooperative deadline (time.monotonic) is
# checked at every parser step and AST node.  This works in any thread (no signals,
# no helper process).  sympy's simplify is never called, so nothing unbounded runs.

# ---------------------------------------------------------------- constants
MAX_ANSWER_CHARS = 1000   # longer boxed answers only get the official string check
MAX_TOKENS = 400          # tokens per scalar expression
MAX_DEPTH = 40            # parser recursion depth
MAX_INT_DIGITS = 300      # digits in one number literal
MAX_EXACT_BITS = 20000    # Fraction numerator/denominator size before falling back to mpmath
MAX_MAG_BITS = 4000       # |value| < 2**4000 for every intermediate numeric result
MAX_ELEMENTS = 60         # elements in a list / set / matrix
TIME_BUDGET_S = 0.5       # cooperative deadline for one call
N_POINTS = 3              # evaluation points when free variables are present
DPS = 60                  # mpmath working precision (digits)
REL_TOL = '1e-40'         # relative tolerance of numeric equality at that precision

UNIT_WORDS = ('units', 'unit', 'square', 'sq', 'cubic', 'cm', 'mm', 'km', 'meters', 'meter',
              'inches', 'inch', 'feet', 'foot', 'ft', 'miles', 'mile', 'mph', 'yards', 'yard',
              'dollars', 'dollar', 'cents', 'cent', 'degrees', 'degree', 'hours', 'hour',
              'minutes', 'minute', 'seconds', 'second', 'days', 'day', 'years', 'year',
              'pounds', 'ounces', 'grams', 'kg', 'liters', 'gallons', 'people', 'students',
              'ways', 'times', 'points', 'pages', 'cups', 'm', 'g', 's', 'min', 'hr')
HEDGE_WORDS = ('or', 'and')            # "42 or 43" becomes the list "42, 43"
DOUBT_WORDS = ('maybe', 'possibly', 'either', 'probably', '?')   # "maybe 42" is wrong
FUNCS = ('arcsin', 'arccos', 'arctan', 'sinh', 'cosh', 'tanh', 'sin', 'cos', 'tan', 'sec',
         'csc', 'cot', 'ln', 'log', 'exp')
EMPTY_WORDS = ('\\emptyset', '\\varnothing', 'empty', 'none', '\\{\\}', '{}', 'emptyset')
SPACING = re.compile(r'\\(?:left|right|big|Big|bigg|Bigg|displaystyle|textstyle|limits)'
                     r'(?![a-zA-Z])|(?<!\\)\\[,;:! ]|\\q?quad(?![a-zA-Z])|~')
TEXT_CMDS = re.compile(r'\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|'
                       r'textnormal|operatorname|boxed|fbox)\s*\{')
THOUSANDS = re.compile(r'^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$')
MATRIX = re.compile(r'^\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}$', re.S)
REL_RE = re.compile(r'\\leq?(?![a-zA-Z])|\\geq?(?![a-zA-Z])|\\[lg]t(?![a-zA-Z])|<=|>=|[<>=]|≤|≥')


class _Timeout(Exception):
    pass


class _Bad(Exception):
    """Unparseable or out-of-bounds input."""


# ---------------------------------------------------------------- boxes
def _brace_end(s, i):
    """Index just past the group opened at s[i] == '{', or -1 if unbalanced."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == '{':
            depth += 1
        elif s[j] == '}':
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def last_boxed(text):
    """Content of the last top-level \\boxed{}/\\fbox{} (or `\\boxed 5`); None if absent/unbalanced."""
    if not isinstance(text, str):
        return None
    found, pos = None, 0
    for m in re.finditer(r'\\(?:boxed|fbox)(?![a-zA-Z])', text):
        if m.start() < pos:
            continue  # nested inside the previous box: the outer one wins
        j = m.end()
        while j < len(text) and text[j] == ' ':
            j += 1
        if j < len(text) and text[j] == '{':
            end = _brace_end(text, j)
            if end < 0:
                return None  # the final box was cut off: no answer
            found, pos = text[j + 1:end - 1], end
        elif j > m.end():  # "\boxed 5" form: up to '$' or end of line
            tail = re.match(r'[^$\n]*', text[j:]).group(0)
            found, pos = tail.strip(), j + len(tail)
    return found


# ---------------------------------------------------------------- official Hendrycks scorer
def _fix_fracs(string):
    parts = string.split('\\frac')
    out = parts[0]
    for sub in parts[1:]:
        out += '\\frac'
        if sub[0] == '{':  # IndexError on a trailing "\frac" is official behaviour
            out += sub
        elif len(sub) < 2:
            return string
        elif sub[1] != '{':
            out += '{' + sub[0] + '}{' + sub[1] + '}' + sub[2:]
        else:
            out += '{' + sub[0] + '}' + sub[1:]
    return out


def _fix_a_slash_b(string):
    if len(string.split('/')) != 2:
        return string
    a, b = string.split('/')
    a, b = int(a), int(b)  # ValueError escapes, as in the original (caller falls back)
    if string != '{}/{}'.format(a, b):
        return string
    return '\\frac{' + str(a) + '}{' + str(b) + '}'


def _fix_sqrt(string):
    if '\\sqrt' not in string:
        return string
    parts = string.split('\\sqrt')
    out = parts[0]
    for sub in parts[1:]:
        out += '\\sqrt' + (sub if sub[0] == '{' else '{' + sub[0] + '}' + sub[1:])
    return out


def strip_string(s):
    """Hendrycks MATH normalisation, as in verl/utils/reward_score/math.py (may raise, like it)."""
    s = s.replace('\n', '').replace('\\!', '').replace('\\\\', '\\')
    s = s.replace('tfrac', 'frac').replace('dfrac', 'frac')
    s = s.replace('\\left', '').replace('\\right', '')
    s = s.replace('^{\\circ}', '').replace('^\\circ', '').replace('\\$', '')
    if '\\text{ ' in s:  # remove units on the right
        parts = s.split('\\text{ ')
        assert len(parts) == 2
        s = parts[0]
    s = s.replace('\\%', '').replace(' .', ' 0.').replace('{.', '{0.')
    if not s:
        return s
    if s[0] == '.':
        s = '0' + s
    if len(s.split('=')) == 2 and len(s.split('=')[0]) <= 2:
        s = s.split('=')[1]
    s = _fix_sqrt(s).replace(' ', '')
    s = _fix_fracs(s)
    if s == '0.5':
        s = '\\frac{1}{2}'
    return _fix_a_slash_b(s)


def _official_last_boxed(string):
    idx = string.rfind('\\boxed')
    if '\\boxed ' in string:
        return '\\boxed ' + string.split('\\boxed ')[-1].split('$')[0]
    if idx < 0:
        idx = string.rfind('\\fbox')
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(string)):  # same scan as the original, braces counted from idx
        if string[i] == '{':
            depth += 1
        elif string[i] == '}':
            depth -= 1
            if depth == 0:
                return string[idx:i + 1]
    return None


def _official_is_equiv(a, b):
    try:
        return strip_string(a) == strip_string(b)
    except Exception:
        return a == b


def official_reward(response, gold):
    """verl's math.compute_score: 1.0 iff strip_string(last box) == strip_string(gold)."""
    try:
        box = _official_last_boxed(response)
        if box is None:
            return 0.0
        if box.startswith('\\boxed '):
            ans = box[len('\\boxed '):]
        else:
            assert box.startswith('\\boxed{') and box.endswith('}')
            ans = box[len('\\boxed{'):-1]
        return 1.0 if _official_is_equiv(ans, gold) else 0.0
    except Exception:
        return 0.0


# ---------------------------------------------------------------- deadline (works in any thread)
_TLS = threading.local()


def _M():
    """Per-thread private mpmath context: some mpmath functions bump ctx.prec temporarily,
    so one shared context could race between threads (and the global mp is never touched)."""
    ctx = getattr(_TLS, 'mp', None)
    if ctx is None:
        ctx = _TLS.mp = mpmath.MPContext()
        ctx.dps = DPS
    return ctx


def _tick():
    if time.monotonic() > getattr(_TLS, 'deadline', float('inf')):
        raise _Timeout()


# ---------------------------------------------------------------- cleaning
def _top_split(s, pattern):
    """Split s on regex `pattern` at bracket depth 0 -> (parts, separators)."""
    parts, seps, depth, start, i = [], [], 0, 0, 0
    rx = re.compile(pattern)
    while i < len(s):
        c = s[i]
        if c in '([{':
            depth += 1
        elif c in ')]}':
            depth -= 1
        elif depth == 0:
            m = rx.match(s, i)
            if m and m.end() > i:
                parts.append(s[start:i])
                seps.append(m.group(0))
                start = i = m.end()
                continue
        i += 1
    parts.append(s[start:])
    return parts, seps


def _wraps(s, i):
    """True if the bracket opened at s[i] closes exactly at the end of s."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] in '([{') - (s[j] in ')]}')
        if depth == 0:
            return j == len(s) - 1
    return False


def _unwrap_text(s):
    """\\text{..}-like wrappers: drop pure-word ones next to a number (units), unwrap the rest."""
    for _ in range(50):
        m = TEXT_CMDS.search(s)
        if not m:
            return s
        end = _brace_end(s, m.end() - 1)
        if end < 0:
            raise _Bad()
        inner, rest = s[m.end():end - 1], s[:m.start()] + s[end:]
        if re.fullmatch(r'[A-Za-z .\-]*', inner) and re.search(r'\d|\\pi', rest) \
                and not m.group(0).startswith(('\\boxed', '\\fbox', '\\operatorname')):
            tail = re.match(r'\s*\^\s*\{?\s*[23]\s*\}?', s[end:])  # "cm^2"
            s = s[:m.start()] + s[end + (tail.end() if tail else 0):]
        else:
            s = s[:m.start()] + inner + s[end:]
    raise _Bad()


def _repeating_decimal(m):
    """A.B(C repeating) -> \\frac{p}{q}: A + (BC - B) / (10^|B| (10^|C| - 1))."""
    whole, fixed, rep = m.group(1) or '0', m.group(2)[:30], m.group(3)
    value = int(whole) + Fraction(int(fixed + rep) - int(fixed or '0'), 10 ** len(fixed) * (10 ** len(rep) - 1))
    return '\\frac{%d}{%d}' % (value.numerator, value.denominator)


def _clean(s):
    """Canonical LaTeX for structural comparison (None = hedged / empty answer)."""
    s = re.sub(r'[\x00-\x1f\x7f]', ' ', s)
    s = re.sub(r'\\[dtc]frac', r'\\frac', s).replace('\\dfrac', '\\frac')
    s = SPACING.sub('', s).replace('\\$', '').replace('$', '')
    s = re.sub(r'\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree', '', s)
    s = s.replace('∞', '\\infty').replace('\\infin ', '\\infty')
    s = re.sub(r'\\text\{\s*(?:%s)\s*\}' % '|'.join(HEDGE_WORDS), ',', s)
    s = re.sub(r'\s+(?:%s)\s+' % '|'.join(HEDGE_WORDS), ',', s)
    s = re.sub(r'\\%|\\text\{\s*percent\s*\}|\s*percent\b', '%', s)
    if any(re.search(r'(?<![a-z])%s(?![a-z])' % re.escape(w), s.lower()) for w in DOUBT_WORDS):
        return None
    s = _unwrap_text(s)
    if '\\over' in s and '\\overline' not in s:
        a, b = s.split('\\over', 1)
        s = '\\frac{%s}{%s}' % (a, b)
    s = re.sub(r'(?<=[\d}\s)])\s*(?:%s)\.?(?:\^\{?[23]\}?)?\s*$' % '|'.join(
        w for w in UNIT_WORDS if len(w) > 1), '', s)
    s = re.sub(r'(?<=\d)\s+(?:%s)\s*$' % '|'.join(w for w in UNIT_WORDS if len(w) == 1), '', s)
    s = re.sub(r'^[a-zA-Z]\s*\\in(?![a-zA-Z])\s*', '', s.replace('{,}', ',').strip())
    s = re.sub(r'^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$', r'\1\\times10^{\2}', s)  # 3.2e7
    s = re.sub(r'(\d*)\.(\d*)\\overline\{(\d{1,30})\}', _repeating_decimal, s)  # 0.1\overline{6} = 1/6
    s = re.sub(r'\\langle(?![a-zA-Z])', '(', re.sub(r'\\rangle(?![a-zA-Z])', ')', s))  # vectors <1, 2> = (1, 2)
    s = re.sub(r'^(\d+)_\{?10\}?$', r'\1', s)  # an explicit base 10 changes nothing
    for _ in range(20):  # peel trailing punctuation and whole-answer braces
        old = s
        s = re.sub(r'^\\approx|[.,\s]+$', '', s).strip()
        if s.startswith('{') and _wraps(s, 0):
            s = s[1:-1].strip()
        if s == old:
            break
    if THOUSANDS.match(s):
        s = s.replace(',', '')
    if s.lower() in EMPTY_WORDS or s in ('\\{ \\}', '\\{\\}'):
        s = '\\emptyset'
    return s or None


def _text_key(s):
    s = re.sub(r'[\s{}]|\\(?=[{}])', '', s)
    return s.lower() if re.fullmatch(r'[A-Za-z]{2,}', s) else s


def _mc_letter(s):
    """A multiple-choice answer: "C", "(C)" or "(C) 12" (spaces may be gone: "(C)12") -> "C"."""
    m = re.fullmatch(r'\(([A-E])\)(?!\s*[-+*/^=,]|.*\([A-E]\)).*|([A-E])', s.strip(), re.S)  # not "(A)+(B)"
    return (m.group(1) or m.group(2)) if m else None


# ---------------------------------------------------------------- LaTeX -> AST parser
_TOK = re.compile(r'(\d+\.?\d*|\.\d+)|\\([a-zA-Z]+)|([a-zA-Z])|(\S)')
_OPS_CMDS = ('cdot', 'times', 'ast', 'div')
GREEK = ('alpha', 'beta', 'gamma', 'delta', 'theta', 'phi', 'varphi', 'lambda', 'mu', 'omega',
         'sigma', 'tau', 'rho', 'psi', 'epsilon', 'varepsilon', 'eta', 'kappa', 'nu', 'xi', 'zeta')
_KNOWN = FUNCS + _OPS_CMDS + GREEK + ('frac', 'sqrt', 'pi', 'infty', 'binom')


def _tokens(s):
    toks = []
    for m in _TOK.finditer(s):
        num, cmd, let, ch = m.groups()
        if num:
            if len(num) > MAX_INT_DIGITS:
                raise _Bad()
            toks.append(('num', num))
        elif cmd:
            if cmd not in _KNOWN:  # "\sinx", "\secx": normalised golds glue the argument
                head = next((k for k in sorted(_KNOWN, key=len, reverse=True)
                             if cmd.startswith(k)), None)
                if head is None:
                    raise _Bad()
                toks.append(('cmd', head))
                toks.extend(('var', c) for c in cmd[len(head):])
                continue
            toks.append(('var', cmd) if cmd in GREEK else ('cmd', cmd))
        else:
            toks.append(('var', let) if let else ('op', ch))
    if len(toks) > MAX_TOKENS:
        raise _Bad()
    return toks


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary (op? unary)*; ... """

    def __init__(self, s):
        self.t, self.i, self.depth = _tokens(s), 0, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else (None, None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, v):
        if self.take()[1] != v:
            raise _Bad()

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Bad()
        _tick()

    def parse(self):
        node = self.expr()
        if self.i != len(self.t):
            raise _Bad()
        return node

    def expr(self):
        self.enter()
        node = self.term()
        while self.peek()[1] in ('+', '-'):
            op = self.take()[1]
            rhs = self.term()
            node = ('add', node, rhs if op == '+' else ('neg', rhs))
        self.depth -= 1
        return node

    def starts_atom(self):
        k, v = self.peek()
        return k in ('num', 'var') or (k == 'op' and v in '([{') or \
            (k == 'cmd' and v not in _OPS_CMDS)

    def term(self):
        node = self.unary()
        if node[0] == 'num' and node[1].denominator == 1 and self.peek() == ('cmd', 'frac'):
            frac = self.power()  # mixed number 2\frac14 = 2 + 1/4
            return ('add', node, frac) if frac[1][0] == frac[2][0] == 'num' else ('mul', node, frac)
        while True:
            k, v = self.peek()
            if v == '*' or (k == 'cmd' and v in ('cdot', 'times', 'ast')):
                self.take()
                node = ('mul', node, self.unary())
            elif v == '/' or (k == 'cmd' and v == 'div'):
                self.take()
                node = ('div', node, self.unary())
            elif self.starts_atom():
                node = ('mul', node, self.power())  # implicit multiplication
            else:
                return node

    def unary(self):
        if self.peek()[1] in ('+', '-'):
            op = self.take()[1]
            self.enter()
            node = self.unary()
            self.depth -= 1
            return node if op == '+' else ('neg', node)
        return self.power()

    def power(self):
        node = self.atom()
        while self.peek()[1] == '!':
            self.take()
            node = ('fact', node)
        if self.peek()[1] == '^':
            self.take()
            node = ('pow', node, self.exponent())
        return node

    def one_digit(self):
        """LaTeX takes one character as an ungrouped argument: \\frac34, x^23."""
        k, v = self.peek()
        if k == 'num' and len(v) > 1:
            self.t[self.i] = ('num', v[1:])
            return ('num', Fraction(v[0]))
        return None

    def exponent(self):
        self.enter()
        if self.peek()[1] in ('+', '-'):
            node = self.unary()
        else:
            node = self.one_digit() or self.atom()
            if self.peek()[1] == '^':  # 9^9^9 is right-associative
                self.take()
                node = ('pow', node, self.exponent())
        self.depth -= 1
        return node

    def arg(self):
        return self.one_digit() or self.atom()

    def atom(self):
        self.enter()
        k, v = self.take()
        if k == 'num':
            if self.peek()[1] == '_':
                raise _Bad()  # base-n literal such as 10001_2: compared as text only
            node = ('num', Fraction(v.rstrip('.') if v.endswith('.') else v))
        elif k == 'var':
            node = ('const', v) if v in ('e', 'i') else ('var', v)
            if self.peek()[1] == '_':
                self.take()
                node = ('var', v + '_' + repr(self.arg()))
        elif k == 'op' and v in '([{|':
            node = self.expr()
            self.expect({'(': ')', '[': ']', '{': '}', '|': '|'}[v])
            node = ('abs', node) if v == '|' else node
        elif k == 'cmd':
            node = self.command(v)
        else:
            raise _Bad()
        self.depth -= 1
        return node

    def command(self, v):
        if v == 'frac':
            return ('div', self.arg(), self.arg())
        if v == 'binom':
            return ('binom', self.arg(), self.arg())
        if v == 'sqrt':
            index = ('num', Fraction(2))
            if self.peek()[1] == '[':
                self.take()
                index = self.expr()
                self.expect(']')
            return ('root', index, self.arg())
        if v in ('pi', 'infty'):
            return ('const', v)
        if v in FUNCS:
            power = base = None
            if self.peek()[1] == '^':
                self.take()
                power = self.exponent()
            if v == 'log' and self.peek()[1] == '_':
                self.take()
                base = self.arg()
            if self.peek()[1] in ('(', '{'):
                arg = self.atom()
            else:  # \sin 2x: the argument runs until the next operator or function
                arg = self.power()
                while self.starts_atom() and self.peek()[1] not in FUNCS:
                    arg = ('mul', arg, self.power())
            node = ('log', base, arg) if base else ('func', v, arg)
            return ('pow', node, power) if power else node
        raise _Bad()


# ---------------------------------------------------------------- evaluation
class _NotExact(Exception):
    pass


def _bits(q):
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _exact(n):
    """Exact rational value, or _NotExact (irrational / variables / too big)."""
    _tick()
    tag = n[0]
    if tag == 'num':
        return n[1]
    if tag == 'neg':
        return -_exact(n[1])
    if tag in ('add', 'mul', 'div'):
        a, b = _exact(n[1]), _exact(n[2])
        if tag == 'div' and b == 0:
            raise _Bad()
        r = a + b if tag == 'add' else a * b if tag == 'mul' else a / b
    elif tag == 'pow':
        a, e = _exact(n[1]), _exact(n[2])
        if e.denominator != 1 or _bits(a) * abs(e) > MAX_EXACT_BITS:
            raise _NotExact()
        if a == 0 and e < 0:
            raise _Bad()
        r = a ** int(e)
    elif tag == 'binom':
        a, b = _exact(n[1]), _exact(n[2])
        if a.denominator != 1 or b.denominator != 1 or not 0 <= b <= a <= 2000:
            raise _NotExact()
        r = Fraction(math.comb(int(a), int(b)))
    else:
        raise _NotExact()
    if _bits(r) > MAX_EXACT_BITS:
        raise _NotExact()
    return r


def _chk(v):
    if _M().isnan(v) or (not _M().isinf(v) and v != 0 and _M().mag(v) > MAX_MAG_BITS):
        raise _Bad()  # overflow guard: keeps every later operation cheap
    return v


_FN = {'sin': lambda x: _M().sin(x), 'cos': lambda x: _M().cos(x), 'tan': lambda x: _M().tan(x),
       'sec': lambda x: 1 / _M().cos(x), 'csc': lambda x: 1 / _M().sin(x),
       'cot': lambda x: 1 / _M().tan(x), 'arcsin': lambda x: _M().asin(x),
       'arccos': lambda x: _M().acos(x), 'arctan': lambda x: _M().atan(x),
       'sinh': lambda x: _M().sinh(x), 'cosh': lambda x: _M().cosh(x),
       'tanh': lambda x: _M().tanh(x), 'ln': lambda x: _M().log(x), 'log': lambda x: _M().log(x),
       'exp': lambda x: _M().exp(x)}
_CONST = {'pi': lambda m: +m.pi, 'e': lambda m: +m.e, 'i': lambda m: m.mpc(0, 1),
          'infty': lambda m: m.inf}


def _num(n, env):
    """60-digit numeric value at the point `env`; _Bad on overflow / division by zero."""
    _tick()
    tag = n[0]
    if tag == 'num':
        return _M().mpf(n[1].numerator) / n[1].denominator
    if tag == 'var':
        return env[n[1]]
    if tag == 'const':
        return _CONST[n[1]](_M())
    a = _num(n[1], env) if tag not in ('func', 'root', 'log') else None
    if tag == 'neg':
        return -a
    if tag in ('add', 'mul', 'div'):
        b = _num(n[2], env)
        if tag == 'div' and abs(b) < _M().mpf(2) ** -MAX_MAG_BITS:
            raise _Bad()
        return _chk(a + b if tag == 'add' else a * b if tag == 'mul' else a / b)
    if tag == 'pow':
        e = _num(n[2], env)
        if a == 0:
            if _M().re(e) <= 0:
                raise _Bad()
            return a
        if abs(e) * (abs(_M().log(abs(a), 2)) + 1) > MAX_MAG_BITS:
            raise _Bad()  # 9^9^9^9 and friends stop here, before mpmath tries
        return _chk(_M().power(a, e))
    if tag == 'abs':
        return abs(a)
    if tag == 'fact':
        if abs(a) > 1000:
            raise _Bad()
        return _chk(_M().gamma(a + 1))
    if tag == 'root':
        k, x = _num(n[1], env), _num(n[2], env)
        if k == 0:
            raise _Bad()
        if _M().im(x) == 0 and x < 0 and k == int(k) and int(k) % 2:  # real odd root
            return -_M().root(-x, int(k))
        return _chk(_M().power(x, 1 / k))
    if tag == 'func':
        x = _num(n[2], env)
        if abs(x) > 2 ** 64:
            raise _Bad()
        return _chk(_FN[n[1]](x))
    if tag == 'binom':
        a, b = _num(n[1], env), _num(n[2], env)
        if abs(a) > 1000 or abs(b) > 1000:
            raise _Bad()
        return _chk(_M().binomial(a, b))
    if tag == 'log':
        return _chk(_M().log(_num(n[2], env)) / _M().log(_num(n[1], env)))
    raise _Bad()


def _vars(n):
    if n[0] == 'var':
        return {n[1]}
    return set().union(*[_vars(c) for c in n[1:] if isinstance(c, tuple)])


def _close(a, b):
    if _M().isinf(a) or _M().isinf(b):
        return a == b
    return abs(a - b) <= _M().mpf(REL_TOL) * max(abs(a), abs(b)) or abs(a - b) < _M().mpf('1e-50')


def _points(names):
    rng = random.Random(20240601)  # deterministic, thread-local generator
    for _ in range(N_POINTS if names else 1):
        yield {v: _M().mpf(rng.random()) * 2 + _M().mpf('0.25') for v in sorted(names)}


def _ast_equal(a, b):
    try:
        return _exact(a) == _exact(b)
    except _NotExact:
        pass
    names = _vars(a) | _vars(b)
    if len(names) > 10:
        raise _Bad()
    return all(_close(_num(a, env), _num(b, env)) for env in _points(names))


def _proportional(f, g, positive):
    """f = c*g for one constant c != 0 (c > 0 for inequalities) at every sample point."""
    names = _vars(f) | _vars(g)
    if not names:
        return False
    ratio = None
    for env in _points(names):
        x, y = _num(f, env), _num(g, env)
        if abs(y) < _M().mpf(REL_TOL) or abs(x) < _M().mpf(REL_TOL):
            return False
        r = x / y
        if ratio is None:
            ratio = r
        elif not _close(r, ratio):
            return False
    return _M().im(ratio) == 0 and (ratio > 0 or not positive)


# ---------------------------------------------------------------- structure and comparison
def _structure(s):
    """(kind, payload): mat / union / set / seq (bracketed tuple or interval) / olist / list /
    rel / scalar.  Bare comma lists are answer sets (unordered), ';' lists are ordered."""
    m = MATRIX.match(s)
    if m:
        rows = [r for r in re.split(r'\\\\|\\(?=[\s\d+\-.(\[])', m.group(2)) if r.strip()]
        return 'mat', [[c.strip() for c in r.split('&')] for r in rows]
    parts, _ = _top_split(s, r'\\cup(?![a-zA-Z])|∪')
    if len(parts) > 1:
        return 'union', parts
    if s.startswith('\\{') and s.endswith('\\}') and _wraps(s, 1):
        inner = s[2:-2].strip()
        return 'set', _top_split(inner, ',')[0] if inner else []
    if s[:1] in '([' and s[-1:] in ')]' and _wraps(s, 0):
        elems = _top_split(s[1:-1], ',')[0]
        if len(elems) > 1:
            return 'seq', (s[0] + s[-1], elems)
    for sep, kind in ((';', 'olist'), (',', 'list')):
        parts = _top_split(s, sep)[0]
        if len(parts) > 1:
            return kind, parts
    parts, ops = _top_split(s, REL_RE.pattern)
    if len(parts) > 1:
        return 'rel', (parts, ops)
    if s.count('\\pm') + s.count('\\mp') == 1:
        s = s.replace('\\mp', '\\pm')
        return 'list', [s.replace('\\pm', '+'), s.replace('\\pm', '-')]
    return 'scalar', s


def _flat(kind, pay):
    if kind == 'mat':
        return [c for r in pay for c in r]
    return pay[1] if kind == 'seq' else pay


def _ordered_eq(xs, ys):
    return len(xs) == len(ys) and all(_eq(x, y) for x, y in zip(xs, ys))


def _unordered_eq(xs, ys):
    if len(xs) != len(ys) or len(xs) > MAX_ELEMENTS:
        return False
    free = list(ys)
    for x in xs:
        hit = next((k for k, y in enumerate(free) if _eq(x, y)), None)
        if hit is None:
            return False
        free.pop(hit)
    return True


def _resplit_cells(cells, want):
    """Normalised MATH golds lost '\\\\' before a command ("-\\sqrt{3}/2\\sqrt{3}/2"): re-split."""
    out = []
    for c in cells:
        out.extend(p for p in re.split(r'(?<=[\w})])(?=\\[a-zA-Z])', c) if p)
    return out if len(out) == want else cells


def _op(o):
    o = o.replace('\\', '')
    return {'le': '<=', 'leq': '<=', 'lt': '<', '≤': '<=', 'ge': '>=', 'geq': '>=', 'gt': '>',
            '≥': '>='}.get(o, o)


def _rel_norm(parts, ops):
    """a OP b with OP in = < <= (a > b becomes b < a)."""
    a, b, op = parts[0], parts[1], _op(ops[0])
    if op.startswith('>'):
        a, b, op = b, a, op.replace('>', '<')
    return a, b, op


def _rel_interval(parts, ops):
    """One-variable inequality ("x < 1", "2 < x <= 5") as an interval string, else None."""
    ops = [_op(o) for o in ops]
    if all(o.startswith('>') for o in ops):
        parts, ops = parts[::-1], [o.replace('>', '<') for o in ops[::-1]]
    if not all(o.startswith('<') for o in ops):
        return None
    var = [k for k, p in enumerate(parts) if re.fullmatch(r'\s*[a-zA-Z]\s*', p)]
    if len(parts) == 3 and var == [1]:
        lo, hi = parts[0], parts[2]
    elif len(parts) == 2 and var == [0]:
        lo, hi = '-\\infty', parts[1]
    elif len(parts) == 2 and var == [1]:
        lo, hi = parts[0], '\\infty'
    else:
        return None
    left = '[' if ops[0] == '<=' and var[0] > 0 else '('
    right = ']' if ops[-1] == '<=' and var[0] < len(parts) - 1 else ')'
    return left + lo + ',' + hi + right


def _rel_eq(ra, rb):
    if len(ra[0]) != 2 or len(rb[0]) != 2:
        return _ordered_eq(ra[0], rb[0]) and ra[1] == rb[1]
    a1, a2, op_a = _rel_norm(*ra)
    b1, b2, op_b = _rel_norm(*rb)
    if op_a != op_b:
        return False
    if _text_key(a1) == _text_key(b1):
        return _eq(a2, b2)
    f = ('add', _Parser(a2).parse(), ('neg', _Parser(a1).parse()))
    g = ('add', _Parser(b2).parse(), ('neg', _Parser(b1).parse()))
    return _proportional(f, g, positive=op_a != '=')


def _eq(a, b):
    """Structural equivalence of two cleaned answers."""
    _tick()
    a, b = a.strip(), b.strip()
    if not a or not b:
        return False
    if _text_key(a) == _text_key(b):
        return True
    (ka, pa), (kb, pb) = _structure(a), _structure(b)
    if ka == 'scalar' and kb == 'scalar':
        return _scalar_eq(a, b)
    if ka == 'rel' and kb == 'rel':
        return _rel_eq(pa, pb)
    if 'rel' in (ka, kb):  # "x = 5" vs "5": compare with the right-hand side of an equation
        (parts, ops), other = (pa, b) if ka == 'rel' else (pb, a)
        if all(o == '=' for o in ops):
            return _eq(parts[-1], other)
        interval = _rel_interval(parts, ops)  # "x < 1" vs "(-\infty, 1)"
        return interval is not None and _eq(interval, other)
    if ka == 'union' or kb == 'union':
        return ka == kb and _unordered_eq(pa, pb)
    if ka == 'seq' and kb == 'seq':
        return pa[0] == pb[0] and _ordered_eq(pa[1], pb[1])
    if 'scalar' in (ka, kb):
        return False
    xs, ys = _flat(ka, pa), _flat(kb, pb)
    if ka == 'mat' and kb == 'mat':
        if [len(r) for r in pa] != [len(r) for r in pb]:
            xs, ys = _resplit_cells(xs, len(ys)), _resplit_cells(ys, len(xs))
        return _ordered_eq(xs, ys)
    if 'mat' in (ka, kb):  # a row/column vector equals the tuple of its entries
        mat = pa if ka == 'mat' else pb
        return (len(mat) == 1 or all(len(r) == 1 for r in mat)) and _ordered_eq(xs, ys)
    if {ka, kb} <= {'set', 'list'}:
        return _unordered_eq(xs, ys)
    return _ordered_eq(xs, ys)


def _lead_number(s):
    """'125normal{miles}' / '5 apples' -> '125' (a word of >= 3 letters after a number)."""
    m = re.fullmatch(r'([-+]?\d+(?:\.\d+)?)\s*([A-Za-z{}\s]*)', s)
    return m.group(1) if m and re.search(r'[A-Za-z]{3}', m.group(2)) else None


def _scalar_eq(a, b):
    la, lb = _mc_letter(a), _mc_letter(b)
    if la or lb:
        return la == lb
    if '%' in a + b:  # rule: p% equals p and equals p/100
        va = [a.replace('%', '')] + (['(%s)/100' % a.replace('%', '')] if '%' in a else [])
        vb = [b.replace('%', '')] + (['(%s)/100' % b.replace('%', '')] if '%' in b else [])
        return any(_scalar_eq(x, y) for x in va for y in vb)
    na, nb = _lead_number(a), _lead_number(b)
    if na or nb:  # drop the trailing words, then compare again
        return _scalar_eq(na or a, nb or b)
    a, b = (re.sub(r'(?<=\d),(?=\d{3}(?!\d))', '', x) for x in (a, b))  # 29,322,216
    if re.fullmatch(r'[A-Za-z]{2,}', _text_key(a)) or \
            re.fullmatch(r'[A-Za-z]{2,}', _text_key(b)):
        return False  # words and letter codes (LQSX) are text, not products of variables
    try:
        ta, tb = _Parser(a).parse(), _Parser(b).parse()
    except _Bad:
        return False
    return _ast_equal(ta, tb)


def _variants(g):
    """Gold '2/3 \\approx 0.67' or '0.56=56' (a number written two ways): accept any part."""
    parts = [p for p in re.split(r'\\approx|≈', g) if p.strip()]
    out = list(parts)
    for p in parts:
        eqs = p.split('=')
        if len(eqs) > 1 and not re.search(r'[A-Za-z]', re.sub(r'\\[a-zA-Z]+', '', p)):
            out += eqs
    return out or [g]


# ---------------------------------------------------------------- public API
_HEDGE = re.compile(r'(?<![a-zA-Z])(?:%s)(?![a-zA-Z])' % '|'.join(HEDGE_WORDS + DOUBT_WORDS[:-1]))


def _is_hedge(s):
    """A list of guesses joined by "or"/"and", or a doubt word ("maybe 42"). The official scorer cuts
    "\\text{ or } 43" away as a unit and would reward the hedge; the labels (and we) call it wrong."""
    return bool(_HEDGE.search(re.sub(r'\\[a-zA-Z]+', ' ', s)))


def reward_outcome(response, gold):
    """(reward, outcome) with outcome in right / wrong / no_box / unparseable / timeout."""
    try:
        box = last_boxed(response)
        # The official scorer reads "42 \\text{ or } 43" as "42" plus units; a hedge skips that shortcut and is
        # compared as the list it is (right against a gold "42, 43", wrong against "42").
        hedge = box is not None and _is_hedge(box) and not _is_hedge(gold)
        if not hedge and official_reward(response, gold) == 1.0:
            return 1.0, 'right'
        if box is None:
            return 0.0, 'no_box'
        if len(box) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return 0.0, 'unparseable'
        _TLS.deadline = time.monotonic() + TIME_BUDGET_S
        ans = _clean(box)
        resp_parts = [p for p in re.split(r'\\approx|≈', ans) if p.strip()] if ans else []
        if not resp_parts:
            return 0.0, 'wrong'
        for g in _variants(gold):
            g = _clean(g)
            # "x \\approx 2.45" or "\\sqrt{6} \\approx 2.45": the exact form or the stated value may match
            if g and any(_eq(part, g) for part in resp_parts[:2] + resp_parts[-1:]):
                return 1.0, 'right'
        return 0.0, 'wrong'
    except _Timeout:
        return 0.0, 'timeout'
    except _Bad:
        return 0.0, 'unparseable'
    except Exception:  # never let a reward call crash training
        return 0.0, 'unparseable'
    finally:
        _TLS.deadline = float('inf')


def math_reward(response, gold):
    return reward_outcome(response, gold)[0]


REWARD_OUTCOMES = ("right", "wrong", "no_box", "unparseable", "timeout")


def score(responses, golds, kind: str = "math"):
    """Rewards (list of float) and outcome counts for a batch of responses."""
    counts = dict.fromkeys(REWARD_OUTCOMES, 0)
    rewards = []
    for response, gold in zip(responses, golds):
        if kind == "official":
            r = official_reward(response, gold)
            outcome = "right" if r else ("no_box" if last_boxed(response) is None else "wrong")
        else:
            r, outcome = reward_outcome(response, gold)
        rewards.append(r)
        counts[outcome] += 1
    return rewards, counts


# ----------------------------------------------------------------------------------------------------
# Sampling from P(y|x)
# ----------------------------------------------------------------------------------------------------
def token_id(tokenizer, token: str) -> int:
    """Id of a special token, taken from the tokenizer (never hard-coded)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or not isinstance(tid, int):
        raise UsageError(f"tokenizer has no {token} token; DSRL needs a ChatML tokenizer (e.g. Qwen) "
                         f"so that {token} can stand in for the prompt")
    return tid


def stop_ids(tokenizer) -> list:
    ids = {tokenizer.eos_token_id}
    ids.add(tokenizer.convert_tokens_to_ids(STOP_TOKEN))
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(seqs, pad: int, device):
    """Left-padded (N, L) ids and attention mask; position ids come from the mask (see positions_from_mask)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs, pad: int, device):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = True
    return ids.to(device), mask.to(device)


def positions_from_mask(mask):
    """Real positions for left-padded rows: 0 at the first real token (as `generate` does it)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def cut_at_stop(ids: list, stops: set):
    """Keep tokens up to and including the first stop token; the rest is padding. -> (ids, truncated)."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k + 1], False
    return ids, True


@torch.inference_mode()  # lighter than no_grad (no version counters): 5-10% faster decoding on CPU
def sample_responses(model, tokenizer, prompt_ids, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                     batch_size=0, min_new_tokens=0, dtype=torch.float32, kv_cache="dynamic", share_prompt=True):
    """G samples per prompt from P(y|x), prompt-major (sample i*G+g belongs to prompt i).
    Returns (response_ids: list of lists ending with the stop token unless truncated, truncated: list of bool)."""
    device = next(model.parameters()).device
    stops, pad = stop_ids(tokenizer), pad_id(tokenizer)
    fast = {}
    if kv_cache in ("static", "compile"):  # transformers compiles the decode step itself with a static cache on GPU
        from transformers import CompileConfig
        fast["cache_implementation"] = "static"
        if kv_cache == "compile":
            fast["compile_config"] = CompileConfig(dynamic=None)
            fast["compile_config"]._compile_all_devices = True  # also on CPU
        share_prompt = False  # a static cache is allocated by generate itself
    per_call = max(1, (batch_size or group_size * len(prompt_ids)) // group_size)  # whole groups per call
    responses, truncated = [], []
    for s in range(0, len(prompt_ids), per_call):
        ids, mask = left_pad(prompt_ids[s:s + per_call], pad, device)  # (B, L), one row per prompt
        with autocast(device, dtype):
            if share_prompt and ids.shape[1] > 1:
                # The G samples of a prompt share its prefix: run the prompt (all but its last token) once and
                # repeat its KV cache G times; generate then starts from the last prompt token.
                prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                position_ids=positions_from_mask(mask[:, :-1]), use_cache=True)
                fast["past_key_values"] = prefill.past_key_values
                fast["past_key_values"].batch_repeat_interleave(group_size)
            out = model.generate(input_ids=ids.repeat_interleave(group_size, 0),
                                 attention_mask=mask.repeat_interleave(group_size, 0), do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=0, min_p=None, repetition_penalty=1.0,
                                 max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, use_cache=True, **fast)
        for row in out[:, ids.shape[1]:].tolist():  # (B*G, T_new)
            r, cut = cut_at_stop(row, set(stops))
            responses.append(r)
            truncated.append(cut)
    return responses, truncated


def autocast(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Log-probs of y in the two spaces: P(y|x) (prompt kept) and P(y) (prompt replaced by <|im_start|>)
# ----------------------------------------------------------------------------------------------------
def _chunk_logprob(hidden, targets, weight, bias, temperature):
    """log pi(target | state) for (K, H) states. Logits (K, V) live only inside this chunk."""
    logits = F.linear(hidden, weight, bias).float()  # (K, V)
    if temperature != 1.0:  # the official actor divides by the rollout temperature; at 1.0 skip the copy
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (K,)


def token_logprobs(model, states, targets, target_mask, temperature, chunk):
    """Per-token log-probs of `targets` (N, T) from the hidden `states` (N, T, H) that predict them.
    Never builds the (N, T, vocab) log-softmax: the vocabulary projection runs on `chunk` real tokens at a
    time under activation checkpointing, so memory stays flat in T (Qwen3's vocabulary is 151,936)."""
    states = states[target_mask]  # (K, H), real response tokens only
    flat_targets = targets[target_mask]  # (K,)
    head = model.get_output_embeddings()
    parts = [checkpoint(_chunk_logprob, states[s:s + chunk], flat_targets[s:s + chunk], head.weight, head.bias,
                        temperature, use_reentrant=False)
             for s in range(0, states.shape[0], chunk)]
    logp = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)  # (N, T)
    logp = logp.masked_scatter(target_mask, torch.cat(parts)) if parts else logp
    return logp


def logprob_y_given_x(model, prompt_ids, response_ids, pad, temperature=1.0, chunk=256, share_prompt=True):
    """log pi(y_t | x, y_<t) for each response token: the standard RL space. -> (logp, mask), (N, T).
    Prompts left-padded, responses right-padded, positions from the attention mask. Samples of the same
    prompt share one forward of that prompt: its KV cache is repeated per sample and gradients flow back
    through it (exact: the prompt's states do not depend on the response)."""
    device = next(model.parameters()).device
    y, y_mask = right_pad(response_ids, pad, device)  # (N, T)
    rows = {}
    which = [rows.setdefault(tuple(p), len(rows)) for p in prompt_ids] if share_prompt else list(range(len(prompt_ids)))
    unique = [list(p) for p in rows] if share_prompt else prompt_ids
    x, x_mask = left_pad(unique, pad, device)  # (B, P), one row per distinct prompt
    idx = torch.tensor(which, device=device)
    prefix = model.base_model(input_ids=x, attention_mask=x_mask, position_ids=positions_from_mask(x_mask),
                              use_cache=True)
    cache = prefix.past_key_values
    cache.batch_select_indices(idx)  # (B, ...) -> (N, ...)
    mask = torch.cat([x_mask[idx], y_mask.long()], 1)  # (N, P+T)
    positions = x_mask.sum(1)[idx, None] + torch.arange(y.shape[1], device=device)  # continue after the prompt
    hidden = model.base_model(input_ids=y, attention_mask=mask, position_ids=positions, past_key_values=cache,
                              use_cache=True).last_hidden_state  # (N, T, H)
    # the last prompt state predicts y_0; the state of y_t predicts y_{t+1}
    states = torch.cat([prefix.last_hidden_state[idx, -1:], hidden[:, :-1]], 1)  # (N, T, H)
    return token_logprobs(model, states, y, y_mask, temperature, chunk), y_mask


def logprob_y(model, start_id, response_ids, pad, temperature=1.0, chunk=256):
    """log pi(y_t | <|im_start|>, y_<t): the pre-train space P(y). Input [<|im_start|>] + y, positions 0..|y|.
    -> (logp, mask), (N, T)."""
    device = next(model.parameters()).device
    y, y_mask = right_pad(response_ids, pad, device)  # (N, T)
    start = torch.full((y.shape[0], 1), start_id, dtype=torch.long, device=device)
    ids = torch.cat([start, y], 1)  # (N, 1+T)
    mask = torch.cat([torch.ones_like(start), y_mask.long()], 1)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)  # 0..|y| (pads are masked)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return token_logprobs(model, hidden[:, :-1], y, y_mask, temperature, chunk), y_mask  # state t predicts y_t


# ----------------------------------------------------------------------------------------------------
# Advantages, sample masks (NSR / PSR), the clipped token-mean loss
# ----------------------------------------------------------------------------------------------------
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
    if samples == "neg":
        return adv < 0
    if samples == "pos":
        return adv > 0
    return torch.ones_like(adv, dtype=torch.bool)


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


def phase_for_step(mode: str, step: int, warmup_steps: int):
    """(space, samples) of a 1-based step. space: "y" = P(y), "y|x" = P(y|x); samples: neg / pos / all."""
    if mode == "dsrl":
        return ("y", "neg") if step <= warmup_steps else ("y|x", "all")
    return {"grpo": ("y|x", "all"), "nsr-prerl": ("y", "neg"), "psr-prerl": ("y", "pos"),
            "nsr-rl": ("y|x", "neg"), "psr-rl": ("y|x", "pos")}[mode]


def policy_loss_backward(model, space, prompt_ids, response_ids, adv, keep, coef, args, start_id, pad):
    """Forward + backward of coef * token_mean(PPO loss) in one space, gradient-accumulated over
    length-sorted micro-batches. Only samples that can change the gradient (kept, A != 0) are run.
    Returns (loss value, number of samples run, tokens run, tokens in the denominator)."""
    kept = [i for i in range(len(response_ids)) if keep[i]]
    n_tokens = sum(len(response_ids[i]) for i in kept)  # token-mean denominator
    # Length-sorted micro-batches pad little; in P(y|x) samples of one prompt stay together (prompt-major
    # input) so that they share the prompt's forward pass.
    by_length = (lambda i: len(response_ids[i])) if space == "y" else (lambda i: (prompt_ids[i], len(response_ids[i])))
    active = sorted((i for i in kept if adv[i] != 0), key=by_length)
    total = 0.0
    dtype = resolve_dtype(args.dtype, args.device)
    device = next(model.parameters()).device
    for s in range(0, len(active), args.micro_batch_size):
        mb = active[s:s + args.micro_batch_size]
        ys = [response_ids[i] for i in mb]
        with autocast(device, dtype):
            if space == "y":
                logp, mask = logprob_y(model, start_id, ys, pad, args.temperature, args.logprob_chunk)
            else:
                logp, mask = logprob_y_given_x(model, [prompt_ids[i] for i in mb], ys, pad, args.temperature,
                                               args.logprob_chunk)
        a = adv[mb].to(device)[:, None]  # (n, 1)
        # One update per batch: old log-probs equal the current ones, so the ratio is exactly 1.
        per_token = ppo_clip_loss(logp, logp.detach(), a, args.clip_low, args.clip_high, args.clip_dual)
        loss = coef * token_mean_loss(per_token, mask, n_tokens)
        loss.backward()
        total += loss.item()
    return total, len(active), sum(len(response_ids[i]) for i in active), n_tokens


def optimizer_step(model, optimizer, grad_clip):
    """Clip, step, zero. A non-finite grad norm skips the update (official behaviour) -> (grad_norm, skipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a step with no active samples still steps AdamW (momentum, weight decay), as officially
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def policy_update(model, gen_model, optimizer, space, prompt_ids, responses, adv, keep, args, start_id, pad):
    """One optimizer step of the phase's loss (P(y) scaled by --prerl-coef), then re-sync the sampler.
    prompt_ids: one per prompt (samples are prompt-major). A non-finite loss or gradient skips the update.
    -> (loss, samples run, tokens run, token-mean denominator, grad_norm, skipped)."""
    coef = args.prerl_coef if space == "y" else 1.0
    x_ids = [p for p in prompt_ids for _ in range(args.group_size)]
    loss, n_used, tokens_used, loss_tokens = policy_loss_backward(model, space, x_ids, responses, adv, keep, coef,
                                                                  args, start_id, pad)
    if math.isfinite(loss):
        grad_norm, skipped = optimizer_step(model, optimizer, args.grad_clip)
    else:
        model.zero_grad(set_to_none=True)
        grad_norm, skipped = float("nan"), True
    if not skipped:
        sync_generation_copy(gen_model, model)
    return loss, n_used, tokens_used, loss_tokens, grad_norm, skipped


# ----------------------------------------------------------------------------------------------------
# Model, checkpoints, logs
# ----------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (use --device cpu)")
    return name


def resolve_dtype(name: str, device: str):
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_model_and_tokenizer(name_or_path: str, device: str = "cpu"):
    """fp32 master weights (an AdamW update at lr 1e-6 vanishes in bf16 weights); compute runs in
    autocast. Hub ids and local paths both work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
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
    """The sampler: the model itself in fp32, or a low-precision copy (re-synced after each update)."""
    if dtype == torch.float32:
        return model
    import copy
    return copy.deepcopy(model).to(dtype).eval()


@torch.no_grad()
def sync_generation_copy(gen_model, model):
    if gen_model is not model:
        for p_gen, p in zip(gen_model.parameters(), model.parameters()):
            p_gen.copy_(p)


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("config.json", "trainer_state.pt")


def save_checkpoint(output_dir, step, model, tokenizer, optimizer, args, extra, keep_last=0):
    """checkpoint-N/: HF weights + tokenizer (AutoModelForCausalLM.from_pretrained works on it) and
    trainer_state.pt. Written to a temporary folder and renamed, so a kill never leaves a checkpoint that
    looks complete but is not. A failed write (disk full) removes the partial folder and raises UsageError."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                    "args": dataclasses.asdict(args), **extra}, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint-{step} ({e.strerror or e}); free disk space and "
                         "resume with --resume (the previous checkpoint is intact)")
    if keep_last:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first. Partial ones (a kill during saving) are skipped with a warning."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*")) + glob.glob(os.path.join(output_dir, ".tmp-checkpoint-*")):
        complete = os.path.basename(path).startswith("checkpoint-") and all(
            os.path.exists(os.path.join(path, f)) for f in CHECKPOINT_FILES)
        if not complete:
            print(f"warning: ignoring incomplete checkpoint {path}", file=sys.stderr)
        elif re.fullmatch(r"checkpoint-\d+", os.path.basename(path)):
            found.append(path)
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


def truncate_jsonl(path, last_step):
    """Drop lines of steps after `last_step` (a run resumed from checkpoint-N repeats steps N+1..)."""
    if not os.path.exists(path):
        return
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
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def resolve_resume(args: Args, explicit: set):
    """Resume: find the checkpoint, restore the run's settings, refuse changes that break resuming.
    -> (args, checkpoint path or None)."""
    if not args.resume:
        return args, None
    if args.resume == "latest":
        ckpts = list_checkpoints(args.output_dir)
        if not ckpts:
            raise UsageError(f"--resume: no complete checkpoint in {args.output_dir} (start without --resume)")
        path = ckpts[-1]
    else:
        path = args.resume.rstrip("/")
        if not all(os.path.exists(os.path.join(path, f)) for f in CHECKPOINT_FILES):
            raise UsageError(f"--resume {path}: not a complete checkpoint folder (needs {', '.join(CHECKPOINT_FILES)})")
        if "output_dir" not in explicit:
            args.output_dir = os.path.dirname(os.path.abspath(path))
    saved = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)["args"]
    clash = sorted(k for k in explicit - RESUMABLE_CHANGES if k in saved and saved[k] != getattr(args, k))
    if clash:
        raise UsageError(f"--resume: {', '.join(clash)} differ from the checkpoint's run "
                         f"({', '.join(f'{k}={saved[k]!r}' for k in clash)}); drop these flags or use a new --output-dir")
    for k, v in saved.items():  # unspecified flags take the run's values
        if k not in explicit and k not in ("resume", "output_dir") and hasattr(args, k):
            setattr(args, k, v)
    return args, path


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------
STOP_REQUEST = {"signal": None}


def _request_stop(signum, frame):
    if STOP_REQUEST["signal"] is not None:  # second Ctrl-C: give up at once
        raise KeyboardInterrupt
    STOP_REQUEST["signal"] = signal.Signals(signum).name
    print(f"\n{STOP_REQUEST['signal']}: finishing this step, saving a checkpoint, then exiting", file=sys.stderr)


def train(args: Args, resume_path=None):
    from tqdm import tqdm
    check_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"output dir {args.output_dir} is not writable ({e.strerror}); choose another --output-dir")
    if not resume_path and list_checkpoints(args.output_dir):
        raise UsageError(f"{args.output_dir} already holds checkpoints of a run; add --resume to continue it "
                         "or choose a new --output-dir")
    examples, n_malformed = load_problems(args.dataset)
    model, tokenizer = load_model_and_tokenizer(resume_path or args.model, device)
    start_id = token_id(tokenizer, START_TOKEN)
    pad = pad_id(tokenizer)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    first_step, bad_in_row = 1, 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    samples_path = os.path.join(args.output_dir, "samples.jsonl")
    if resume_path:
        state = torch.load(os.path.join(resume_path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        first_step, bad_in_row = state["step"] + 1, state.get("bad_in_row", 0)
        for path in (metrics_path, samples_path):
            truncate_jsonl(path, state["step"])
        print(f"resumed from {resume_path} at step {state['step']}", file=sys.stderr)
    else:
        for path in (metrics_path, samples_path):
            open(path, "w").close()
    with open(os.path.join(args.output_dir, "config.json"), "w") as fh:
        json.dump({**dataclasses.asdict(args), "resolved_device": device, "resolved_dtype": str(dtype),
                   "n_examples": len(examples), "n_malformed_rows": n_malformed}, fh, indent=2)
    if n_malformed:
        print(f"warning: skipped {n_malformed} malformed rows of {args.dataset}", file=sys.stderr)
    gen_model = generation_copy(model, dtype)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)

    def checkpoint_now(step):
        return save_checkpoint(args.output_dir, step, model, tokenizer, optimizer, args,
                               {"bad_in_row": bad_in_row}, args.save_total_limit)

    bar = tqdm(range(first_step, args.steps + 1), initial=first_step - 1, total=args.steps, dynamic_ncols=True)
    step = first_step - 1
    for step in bar:
        t0 = time.time()
        space, samples = phase_for_step(args.mode, step, args.warmup_steps)
        if args.mode == "dsrl" and step == args.warmup_steps + 1:
            tqdm.write(f"=== step {step}: warm-up over, policy reincarnation: GRPO in P(y|x) from here ===")
        # 1. sample G responses per prompt from P(y|x)
        idx = batch_indices(len(examples), args.seed, step, args.prompts_per_step)
        batch = [examples[i] for i in idx]
        prompt_ids = [build_prompt(tokenizer, ex["messages"], args.max_prompt_tokens) for ex in batch]
        responses, truncated = sample_responses(gen_model, tokenizer, prompt_ids, args.group_size, args.max_new_tokens,
                                                args.temperature, args.top_p, args.gen_batch_size, dtype=dtype,
                                                kv_cache=args.kv_cache)
        t_gen = time.time() - t0
        # 2. reward
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        golds = [ex["answer"] for ex in batch for _ in range(args.group_size)]
        rewards, outcomes = score(texts, golds, args.reward)
        # 3. advantages and which samples take part
        adv = group_advantages(rewards, args.group_size, use_std=(space == "y|x"))  # (N,)
        keep = sample_mask(adv, samples)
        # 4. loss in the phase's space, backward, update
        loss, n_used, tokens_used, loss_tokens, grad_norm, skipped = policy_update(
            model, gen_model, optimizer, space, prompt_ids, responses, adv, keep, args, start_id, pad)
        bad_in_row = bad_in_row + 1 if skipped else 0
        # 5. log
        r = torch.tensor(rewards).view(-1, args.group_size)  # (B, G)
        lengths = [len(y) for y in responses]
        row = {"step": step, "phase": "warmup" if (args.mode == "dsrl" and space == "y") else "rl",
               "space": "P(y)" if space == "y" else "P(y|x)", "samples": samples,
               "reward_mean": r.mean().item(), "n_pos": int((adv > 0).sum()), "n_neg": int((adv < 0).sum()),
               "n_used": n_used, "tokens_used": tokens_used, "loss_tokens": loss_tokens,
               "solved_all": int((r.min(1).values == 1).sum()), "solved_none": int((r.max(1).values == 0).sum()),
               "loss": loss, "grad_norm": grad_norm, "skipped": int(skipped),
               "response_len_mean": sum(lengths) / len(lengths), "truncated_frac": sum(truncated) / len(truncated),
               "gen_tokens": sum(lengths), **{f"reward_{k}": v for k, v in outcomes.items()},
               "lr": optimizer.param_groups[0]["lr"], "time_gen_s": t_gen, "time_step_s": time.time() - t0}
        if args.eval_every and step % args.eval_every == 0:
            row.update(evaluate_during_training(gen_model, tokenizer, args, dtype))
        append_jsonl(metrics_path, [row])
        append_jsonl(samples_path, [{"step": step, "prompt_index": idx[i // args.group_size], "response": texts[i],
                                     "gold": golds[i], "reward": rewards[i], "advantage": adv[i].item(),
                                     "used_in_loss": bool(keep[i]), "truncated": truncated[i]}
                                    for i in range(len(texts))])
        tqdm.write(f"step {step:4d} {row['space']:6s} {samples:3s} reward {row['reward_mean']:.3f} "
                   f"all/none {row['solved_all']}/{row['solved_none']} used {n_used:3d} loss {loss:+.5f} "
                   f"gnorm {grad_norm:.3f}{' SKIPPED' if skipped else ''} len {row['response_len_mean']:.0f} "
                   f"gen {t_gen:.1f}s step {row['time_step_s']:.1f}s")
        # 6. checkpoint, stop requests, runaway NaN
        stop = STOP_REQUEST["signal"]
        if step % args.save_every == 0 or step == args.steps or stop or bad_in_row >= args.max_bad_steps:
            checkpoint_now(step)
        if bad_in_row >= args.max_bad_steps:
            bar.close()
            print(f"error: {bad_in_row} non-finite steps in a row at step {step}; no NaN was written, "
                  f"last weights in {args.output_dir}/checkpoint-{step}; lower --lr or check the data", file=sys.stderr)
            return 3
        if stop:
            bar.close()
            print(f"stopped by {stop} after step {step}; continue with: python dsrl.py --output-dir "
                  f"{args.output_dir} --resume", file=sys.stderr)
            return 0
    bar.close()
    return 0


def evaluate_during_training(model, tokenizer, args, dtype):
    """--eval-every: the accuracy evaluation of eval.py (one implementation), flattened into the metrics."""
    import importlib
    evaluator = importlib.import_module("eval")
    results = evaluator.evaluate_accuracy(model, tokenizer, [b for b in args.eval_benchmarks.split(",") if b],
                                          k=args.eval_k, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_p=args.top_p, dtype=dtype,
                                          gen_batch_size=args.gen_batch_size, reward=args.reward)
    return {f"eval/{bench}/{key}": value for bench, res in results.items() for key, value in res.items()
            if isinstance(value, (int, float))}


def main(argv=None):
    try:
        args, explicit = parse_args(argv)
        args, resume_path = resolve_resume(args, explicit)
        return train(args, resume_path)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; the last checkpoint is complete (atomic writes)
        print("\ninterrupted; continue from the last checkpoint with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
