"""eval.py - what the DSRL paper measures (arXiv 2604.14142, method.md section 4), as four subcommands.

  accuracy    Avg@k, unbiased pass@k and maj@k per benchmark, from k samples per problem.
              python eval.py accuracy --model runs/dsrl/checkpoint-348 --benchmarks aime24,aime25,amc23 --k 32
  behaviours  reflection / transition thoughts (SEAL rule) and four reasoning behaviours per response.
              python eval.py behaviours --samples runs/dsrl/samples.jsonl
  align       per rollout, inner product and cosine of the full-parameter gradients of log P(y|x) and log P(y).
              python eval.py align --model Qwen/Qwen3-4B --benchmark amc23 --rollouts 400
  plot        PNG curves of one or more run dirs (metrics.jsonl, samples.jsonl), warm-up -> GRPO hand-over marked.
              python eval.py plot runs/dsrl runs/grpo --out plots

Sampling, reward, chat prompt and the two log-probs are dsrl.py's own functions (one implementation).
The trainer's --eval-every calls `evaluate_accuracy` below. Each subcommand writes JSON + Markdown (+ JSONL)
into --output and prints the Markdown table. Bad input: one `error: ...` line, exit code 2.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter

import torch

import dsrl
import grader  # maj@k groups answers by its equivalence

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
}
EARLY_TOKENS = 32  # align: response positions < this count as "early" (where the missing prompt matters most)


# ----------------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------------
def gold_text(value) -> str:
    """Hub answers come as str, int or float (amc23 stores 27.0); 27.0 -> "27" so the string scorer matches."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def deduplicate(examples):
    """Keep the first copy of each prompt. The official validation files repeat every problem 20 times
    (aime_2024_20times.parquet); Avg@k must count a problem once, with our own k samples."""
    seen, unique = set(), []
    for ex in examples:
        key = tuple((m.get("role"), m["content"]) for m in ex["messages"])
        if key not in seen:
            seen.add(key)
            unique.append(ex)
    return unique


def load_benchmark(name: str, limit: int = 0):
    """-> (display name, unique examples [{"messages", "answer"}], number of duplicate rows dropped)."""
    if name in BENCHMARKS:
        hub_id, split, q_col, a_col = BENCHMARKS[name]
        rows = dsrl.read_rows(hub_id, split)
        if rows and not {q_col, a_col} <= set(rows[0]):
            raise dsrl.UsageError(f"{hub_id} has columns {sorted(rows[0])}; the registry expects {q_col}, {a_col}")
        examples = [dsrl.row_to_example({"problem": r[q_col], "answer": gold_text(r[a_col])}) for r in rows]
        examples = [e for e in examples if e is not None]
    else:
        examples, _ = dsrl.load_problems(name)
        name = os.path.splitext(os.path.basename(name))[0] if os.path.exists(name) else name
    unique = deduplicate(examples)
    return name, unique[:limit] if limit else unique, len(examples) - len(unique)


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


def evaluate_benchmark(model, tokenizer, name, examples, k, max_new_tokens, temperature, top_p, dtype,
                       gen_batch_size, reward):
    """k samples per problem from P(y|x) -> (metrics, per-sample rows)."""
    prompts = [dsrl.build_prompt(tokenizer, ex["messages"], 10 ** 9) for ex in examples]  # eval never cuts
    responses, truncated = dsrl.sample_responses(model, tokenizer, prompts, k, max_new_tokens, temperature, top_p,
                                                 gen_batch_size, dtype=dtype)  # prompt-major, (P*k,)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rows = []
    for i, text in enumerate(texts):
        gold = examples[i // k]["answer"]
        r, outcome = sample_outcome(text, gold, reward)
        rows.append({"benchmark": name, "problem_index": i // k, "sample": i % k, "response": text, "gold": gold,
                     "extracted": extracted_answer(text), "reward": r, "outcome": outcome,
                     "length": len(responses[i]), "truncated": truncated[i]})
    per_problem = lambda key: [[row[key] for row in rows[p * k:(p + 1) * k]] for p in range(len(examples))]
    metrics = accuracy_metrics(per_problem("reward"), per_problem("extracted"), per_problem("length"),
                               per_problem("truncated"), k)
    metrics.update({f"outcome_{o}": sum(row["outcome"] == o for row in rows) for o in dsrl.REWARD_OUTCOMES})
    return metrics, rows


def evaluate_accuracy(model, tokenizer, benchmarks, k, max_new_tokens, temperature=1.0, top_p=1.0,
                      dtype=torch.float32, gen_batch_size=0, reward="math", limit=0, samples_path=None, seed=0):
    """{benchmark: {"avg@k", "pass@1", ..., "maj@k", "response_len_mean", "truncated_frac", "n_problems", ...}}.
    Runs under its own seed in a forked RNG, so calling it from the trainer (--eval-every) does not change
    the training run's random stream."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    results = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for bench in benchmarks:
            name, examples, n_dup = load_benchmark(bench, limit)
            metrics, rows = evaluate_benchmark(model, tokenizer, name, examples, k, max_new_tokens, temperature,
                                               top_p, dtype, gen_batch_size, reward)
            results[name] = {**metrics, "duplicates_dropped": n_dup}
            if samples_path:
                dsrl.append_jsonl(samples_path, rows)
    return results


def metrics_for_training(model, tokenizer, args, dtype, gen_batch_size=None) -> dict:
    """dsrl.py --eval-every: evaluate_accuracy on --eval-benchmarks, flattened to `eval/<bench>/<key>` metrics.
    gen_batch_size: the sequences per generate call the trainer's memory plan resolved (default: --gen-batch-size)."""
    batch = args.gen_batch_size if gen_batch_size is None else gen_batch_size
    results = evaluate_accuracy(model, tokenizer, [b for b in args.eval_benchmarks.split(",") if b], k=args.eval_k,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                dtype=dtype, gen_batch_size=batch, reward=args.reward)
    return {f"eval/{bench}/{key}": value for bench, res in results.items() for key, value in res.items()
            if isinstance(value, (int, float))}


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
    return {"rollouts": len(per_rollout), "inner_mean": statistics.mean(inner), "inner_median": statistics.median(inner),
            "cosine_mean": statistics.mean(cos), "cosine_median": statistics.median(cos),
            "negative_frac": sum(i < 0 for i in inner) / len(inner), **token_agreement(lx, ly)}


def run_align(model, tokenizer, examples, rollouts, a, dtype):
    """Sample `rollouts` responses spread evenly over the problems, then one gradient pair per rollout."""
    per_problem = math.ceil(rollouts / len(examples))
    prompts = [dsrl.build_prompt(tokenizer, ex["messages"], 10 ** 9) for ex in examples]
    responses, _ = dsrl.sample_responses(model, tokenizer, prompts, per_problem, a.max_new_tokens, a.temperature,
                                         a.top_p, a.gen_batch_size, dtype=dtype)
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


def plot_runs(run_dirs: list, out_dir: str) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise dsrl.UsageError("plot needs matplotlib: pip install matplotlib")
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
    written = [plot_panels(plt, runs, keys, os.path.join(out_dir, f)) for f, keys in figures.items()]
    if behaviour_runs:
        written.append(plot_panels(plt, behaviour_runs, ["reflection", "transition", *BEHAVIOURS],
                                   os.path.join(out_dir, "behaviours.png")))
    return [w for w in written if w]


# ----------------------------------------------------------------------------------------------------
# Files and tables
# ----------------------------------------------------------------------------------------------------
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


def setup_model(a):
    device = dsrl.resolve_device(a.device)
    torch.manual_seed(a.seed)
    model, tokenizer = dsrl.load_model_and_tokenizer(a.model, device)
    return model.eval(), tokenizer, dsrl.resolve_dtype(a.dtype, device)


def cmd_accuracy(a):
    model, tokenizer, dtype = setup_model(a)
    os.makedirs(a.output, exist_ok=True)
    samples_path = os.path.join(a.output, "accuracy_samples.jsonl")
    open(samples_path, "w").close()
    results = evaluate_accuracy(model, tokenizer, [b for b in a.benchmarks.split(",") if b], a.k, a.max_new_tokens,
                                a.temperature, a.top_p, dtype, a.gen_batch_size, a.reward, a.limit, samples_path,
                                a.seed)
    write_report(a.output, "accuracy", {"config": vars(a), "results": results}, accuracy_markdown(results, a.k))


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
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences per generate call, 0 = all at once")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--reward", default="math", choices=["math", "official"], help="dsrl.py's scorer")
    p.add_argument("--limit", type=int, default=0, help="first N unique problems per benchmark, 0 = all")
    p.add_argument("--output", default=output, help="output directory")


def build_parser():
    ex = lambda s: dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog="example:\n  " + s)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="Avg@k, pass@k, maj@k per benchmark",
                         **ex("python eval.py accuracy --model Qwen/Qwen3-0.6B --benchmarks aime24,amc23 --k 32"))
    add_sampling_flags(acc, "eval_results/accuracy")
    acc.add_argument("--benchmarks", default="aime24,aime25,amc23",
                     help=f"comma list of {', '.join(BENCHMARKS)} or .parquet/.jsonl files")
    acc.add_argument("--k", type=int, default=32, help="samples per problem (paper: Avg@32; official validation: 20)")
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
    pl = sub.add_parser("plot", help="PNG curves of run dirs", **ex("python eval.py plot runs/dsrl runs/grpo --out plots"))
    pl.add_argument("run_dirs", nargs="+", help="dsrl.py output dirs (metrics.jsonl, optional samples.jsonl)")
    pl.add_argument("--out", default="plots", help="directory for the PNGs")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        check(a)
        {"accuracy": cmd_accuracy, "behaviours": cmd_behaviours, "align": cmd_align, "plot": cmd_plot}[a.command](a)
        return 0
    except dsrl.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
