"""junk_summary.py - the tables of course/run_junk_experiment.sh (experiment d), as markdown.

    python course/junk_summary.py RUNS_DIR

RUNS_DIR/seedS/{start,grpo,nsr-prerl,dsrl,psr-prerl}: per run and seed, the reward curve (mean reward_mean of the
first 5 and last 5 steps, and of the first 20 steps in P(y|x): GRPO's steps 1-20, DSRL's 20 steps after its
warm-up), the share of junk among the sampled answers (steps 1-5, 16-20, last 5), pass@1/pass@8 of eval.py
accuracy on the held-out phrasings, the junk's probability by teacher forcing (P(junk|x) averaged over the test
prompts, and P(junk) with the prompt removed, tiny_task.py) and the gradient alignment (eval.py align: mean
cosine of grad log P(y|x) and grad log P(y) over the rollouts). Then the mean over seeds.
"""
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_task  # noqa: E402

RUNS = ["start", "grpo", "nsr-prerl", "dsrl", "psr-prerl"]
COLUMNS = ["first5", "last5", "first20_rl", "junk1-5", "junk16-20", "junk_last5", "pass@1", "pass@8", "P(junk|x)",
           "P(junk)", "P(right|x)", "align_cos"]
JUNK_TEXT = tiny_task.JUNK.format(d="")  # the junk answer as the samples hold it


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def reward_curve(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        m = [json.loads(line) for line in fh if line.strip()]
    r = [x["reward_mean"] for x in m]
    rl = [x["reward_mean"] for x in m if x["space"] == "P(y|x)"][:20]  # the first 20 steps in P(y|x)
    out = {"first5": sum(r[:5]) / 5, "last5": sum(r[-5:]) / 5, "first20_rl": sum(rl) / len(rl) if rl else None}
    return {**out, **junk_shares(os.path.join(run_dir, "samples.jsonl"), len(m))}


def junk_shares(path, steps):
    """Share of the sampled answers that are the junk answer, in steps 1-5, 16-20 and the last 5."""
    if not os.path.exists(path):
        return {}
    windows = {"junk1-5": range(1, 6), "junk16-20": range(16, 21), "junk_last5": range(steps - 4, steps + 1)}
    counts = {k: [0, 0] for k in windows}
    with open(path) as fh:
        for line in fh:
            sample = json.loads(line)
            for key, steps_in in windows.items():
                if sample["step"] in steps_in:
                    counts[key][0] += sample["response"].strip() == JUNK_TEXT
                    counts[key][1] += 1
    return {k: junk / total for k, (junk, total) in counts.items() if total}


def junk_probabilities(model_dir, test_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # tables only on the console
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    given_x = tiny_task.answer_distribution(model, tok, test_rows)
    return {"P(junk|x)": given_x["p_junk"], "P(right|x)": given_x["p_right"],
            "P(junk)": tiny_task.marginal_distribution(model, tok)["p_junk"]}


def run_row(seed_dir, run):
    run_dir = os.path.join(seed_dir, run)
    row = dict(reward_curve(run_dir))
    acc = read_json(os.path.join(run_dir, "eval", "accuracy.json"))
    if acc:
        res = next(iter(acc["results"].values()))
        row.update({"pass@1": res.get("pass@1"), "pass@8": res.get("pass@8")})
    align = read_json(os.path.join(run_dir, "align", "align.json"))
    if align:
        row["align_cos"] = align["cosine_mean"]
    model = os.path.join(seed_dir, "task", "model") if run == "start" else \
        max(glob.glob(os.path.join(run_dir, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]), default=None)
    if model:
        row.update(junk_probabilities(model, tiny_task.all_rows(tiny_task.TEST_TEMPLATES)))
    return row


def table(rows, first):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| " + " | ".join([first] + COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    return "\n".join(lines + ["| " + " | ".join([name] + [fmt(r.get(c)) for c in COLUMNS]) + " |" for name, r in rows])


def mean_rows(rows):
    out = {}
    for c in COLUMNS:
        values = [r[c] for r in rows if r.get(c) is not None]
        out[c] = sum(values) / len(values) if values else None
    return out


def main(runs_dir):
    seeds = sorted(d for d in os.listdir(runs_dir) if d.startswith("seed") and os.path.isdir(os.path.join(runs_dir, d)))
    every = {s: {run: run_row(os.path.join(runs_dir, s), run) for run in RUNS} for s in seeds}
    for s in seeds:
        print(f"\n{s}\n\n" + table([(run, every[s][run]) for run in RUNS], "run"))
    print(f"\nmean over {len(seeds)} seeds\n\n" + table([(run, mean_rows([every[s][run] for s in seeds]))
                                                       for run in RUNS], "run"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/junk")
