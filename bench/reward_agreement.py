"""Agreement and latency of dsrl.math_reward, the official string scorer and (optionally) math_verify.

    python bench/reward_agreement.py [CASES.jsonl]        # default: testdata/answer_cases_dev.jsonl

math_verify is not a dependency: if a side venv has it (`python3 -m venv /tmp/mv && /tmp/mv/bin/pip install
math-verify`), pass `--math-verify /tmp/mv/bin/python` to add its row (it runs in that interpreter).
"""
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
          f"{ms(0.99):.1f} ms | {1000 * latencies[-1]:.1f} ms |", flush=True)


def math_verify_equal(response, gold):
    from math_verify import parse, verify
    return verify(parse("$\\boxed{%s}$" % gold), parse(response))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--math-verify" in argv:
        del argv[argv.index("--math-verify"):argv.index("--math-verify") + 2]
    args = [a for a in argv if not a.startswith("--")]
    path = args[0] if args else os.path.join(REPO, "testdata", "answer_cases_dev.jsonl")
    cases = [json.loads(line) for line in open(path) if line.strip()]
    if "--only-math-verify" in sys.argv:  # inside the side venv
        import logging
        logging.disable(logging.CRITICAL)
        measure("math_verify", math_verify_equal, cases)
        sys.exit()
    import dsrl
    print(f"{len(cases)} cases, {sum(bool(c.get('ambiguous')) for c in cases)} ambiguous")
    print("| scorer | agreement | non-ambiguous | p50 | p99 | max |\n|---|---|---|---|---|---|")
    measure("dsrl.math_reward", dsrl.math_reward, cases)
    measure("official string scorer", dsrl.official_reward, cases)
    if "--math-verify" in sys.argv:
        python = sys.argv[sys.argv.index("--math-verify") + 1]  # the side venv's interpreter
        subprocess.run([python, __file__, path, "--only-math-verify"])
