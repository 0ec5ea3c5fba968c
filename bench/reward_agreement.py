"""Agreement and latency of dsrl's reward (dsrl.reward), the official string scorer and (optionally) math_verify.

    python bench/reward_agreement.py [CASES.jsonl]        # default: testdata/answer_cases_dev.jsonl
    python bench/reward_agreement.py --math-verify /tmp/mv/bin/python

Each case is {"response", "gold", "equal"[, "ambiguous"]}: agreement = share of cases where the scorer's verdict
equals the label; "non-ambiguous" leaves out the cases marked ambiguous. Latency: p50, p99, max of one call.
Also printed: the outcome counts of dsrl.reward (right / wrong / no_box / unparseable / timeout), as the trainer
logs them.

math_verify is not a dependency: if a side venv has it (`python3 -m venv /tmp/mv && /tmp/mv/bin/pip install
math-verify`), pass `--math-verify /tmp/mv/bin/python` to add its row (it runs in that interpreter).
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(name, fn, cases):
    latencies, agree, agree_clear, n_clear = [], 0, 0, 0
    for c in cases:
        t = time.perf_counter()
        try:
            got = bool(fn(c["response"], c["gold"]))
        except Exception:  # a checker that raises counts as "not equal"
            got = False
        latencies.append(time.perf_counter() - t)
        ok = got == c["equal"]
        agree += ok
        if not c.get("ambiguous"):
            n_clear += 1
            agree_clear += ok
    latencies.sort()
    ms = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    print(f"| {name} | {agree / len(cases):.3f} | {agree_clear / n_clear:.3f} | {ms(0.5):.2f} ms | "
          f"{ms(0.99):.2f} ms | {1000 * latencies[-1]:.2f} ms |", flush=True)


def math_verify_equal(response, gold):
    from math_verify import parse, verify
    return verify(parse("$\\boxed{%s}$" % gold), parse(response))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="?", default=os.path.join(REPO, "testdata", "answer_cases_dev.jsonl"),
                    help="labelled cases, jsonl (default: testdata/answer_cases_dev.jsonl)")
    ap.add_argument("--math-verify", metavar="PYTHON", default="",
                    help="python of a venv with math-verify installed: adds its row")
    ap.add_argument("--only-math-verify", action="store_true", help=argparse.SUPPRESS)  # inside that venv
    a = ap.parse_args()
    with open(a.cases) as fh:
        cases = [json.loads(line) for line in fh if line.strip()]
    if a.only_math_verify:
        import logging
        logging.disable(logging.CRITICAL)
        from importlib.metadata import version
        measure(f"math_verify {version('math-verify')}", math_verify_equal, cases)
        return
    import dsrl
    print(f"{len(cases)} cases, {sum(bool(c.get('ambiguous')) for c in cases)} ambiguous")
    print("| scorer | agreement | non-ambiguous | p50 | p99 | max |\n|---|---|---|---|---|---|")
    measure("dsrl.reward", lambda response, gold: dsrl.reward(response, gold)[0], cases)
    measure("official string scorer", dsrl.official_reward, cases)
    if a.math_verify:
        subprocess.run([a.math_verify, os.path.abspath(__file__), a.cases, "--only-math-verify"], check=True)
    outcomes = collections.Counter(dsrl.reward(c["response"], c["gold"])[1] for c in cases)
    print("dsrl.reward outcomes: " + ", ".join(f"{k} {outcomes.get(k, 0)}" for k in dsrl.REWARD_OUTCOMES))


if __name__ == "__main__":
    main()
