"""summarize.py - the tables of course/run_experiments.sh: reward curves and pass@k of each run, as markdown.

    python course/summarize.py RUNS_DIR

For every run dir RUNS_DIR/NAME (metrics.jsonl, optional wall_s.txt, optional eval/accuracy.json) one row:
mean reward_mean of the first 5 and last 5 steps, their gain, the final truncated fraction and wall time,
and Avg@8 (= pass@1) / pass@8 / maj@8 of the final checkpoint on the test and train problems.
RUNS_DIR/start/eval/accuracy.json (the model before RL) is the first row.
"""
import json
import os
import sys

ORDER = ["start", "grpo", "dsrl", "nsr-prerl", "psr-prerl", "dsrl-w0", "dsrl-w19", "nsr-rl"]


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_row(run_dir):
    row = {"run": os.path.basename(os.path.normpath(run_dir))}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        m = read_jsonl(metrics_path)
        r = [x["reward_mean"] for x in m]
        row.update(steps=len(m), warmup_steps=sum(x["phase"] == "warmup" for x in m), first5=sum(r[:5]) / 5,
                   last5=sum(r[-5:]) / 5, min_reward=min(r), trunc_last5=sum(x["truncated_frac"] for x in m[-5:]) / 5)
        row["gain"] = row["last5"] - row["first5"]
    wall = os.path.join(run_dir, "wall_s.txt")
    if os.path.exists(wall):
        row["wall_s"] = float(open(wall).read())
    acc = os.path.join(run_dir, "eval", "accuracy.json")
    if os.path.exists(acc):
        for bench, res in json.load(open(acc))["results"].items():
            k = res["n_samples"] // res["n_problems"]
            for key in (f"avg@{k}", f"pass@{k}", f"maj@{k}"):  # pass@1 is avg@k
                row[f"{bench} {key}"] = res[key]
    return row


def table(rows, cols):
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def main(runs_dir):
    names = [n for n in ORDER if os.path.isdir(os.path.join(runs_dir, n))]
    names += sorted(n for n in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, n))
                    and n not in names and os.path.exists(os.path.join(runs_dir, n, "metrics.jsonl")))
    rows = [run_row(os.path.join(runs_dir, n)) for n in names]
    train_cols = ["run", "steps", "warmup_steps", "first5", "last5", "gain", "min_reward", "trunc_last5", "wall_s"]
    print("Training reward (reward_mean of metrics.jsonl)\n")
    print(table([r for r in rows if "steps" in r], train_cols))
    eval_cols = ["run"] + list(dict.fromkeys(k for r in rows for k in r if k.startswith(("test ", "train "))))
    print("\nFinal checkpoints, eval.py accuracy (k samples per problem)\n")
    print(table([r for r in rows if len(r) > 1 and any(k in r for k in eval_cols[1:])], eval_cols))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/course")
