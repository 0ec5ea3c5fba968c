"""python course/grade.py PATH/TO/dsrl.py: grade a student's dsrl.py (and the eval.py beside it), offline, on CPU.

    python course/grade.py student/dsrl.py                  # one line per graded part, then score=K/N
    python course/grade.py student/dsrl.py --only 3 4       # some exercises
    python course/grade.py student/dsrl.py --json out.json  # also Gradescope's results.json format
    python course/grade.py --all submissions/ [--json all.json]   # one sub-folder per student: a table

Each exercise (exercise 3 in two parts, 3a and 3b) is graded by the spec tests of test_dsrl.py that pin its
function down with numbers: hand-made tensors with expected values, and log-probs and gradients on a tiny model
built in the test, checked against an independent computation. Never against the reference implementation.

How: the student's dsrl.py, the eval.py beside it, grader.py and scale.py are copied into a fresh folder, and
the tests import that folder (DSRL_UNDER_TEST), so nothing of the reference is imported in their place. Without an
eval.py beside dsrl.py, the eval.py exercise is not graded (FAIL, with the reason). Each part runs in its
own pytest process (forked from the grader after it imported torch and transformers, on Linux), one thread
each, with a time limit (an endless loop is that exercise's FAIL); two run at a time by default (--jobs).
Exit code 0 only when every chosen part passes; 2 for a usage problem.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from make_exercises import EXERCISES, cut_bodies  # noqa: E402  (one list of exercises for the copy and the grade)

TESTS = os.path.join(ROOT, "test_dsrl.py")
# Graded parts: an exercise's number, or its number and a letter where it is graded in parts. Exercise 3 gives 3a's
# points for right log-probs and gradients by any route (share_prompt=False), 3b's for sharing the prompt's forward.
SPEC_TESTS = {  # part -> the spec tests of test_dsrl.py that grade it
    "1": ["test_group_advantages_without_std_is_reward_minus_group_mean", "test_group_advantages_with_unbiased_std",
        "test_group_advantages_with_unequal_group_counts", "test_group_advantages_random_shapes_against_a_plain_python_oracle"],
    "2": ["test_sample_masks_nsr_psr_all", "test_sample_masks_random_advantages_against_a_plain_python_oracle"],
    "3a": ["test_logprob_y_given_x_equals_models_own_cross_entropy",
           "test_shared_prompt_forward_equals_separate_forwards[separate]", "test_temperature_divides_logits_given_x",
           "test_logprob_y_given_x_continues_positions_after_the_prompt",
           "test_logprob_y_given_x_gradient_equals_token_by_token_decoding",
           "test_logprob_y_given_x_memory_stays_flat_in_vocabulary_times_length"],
    "3b": ["test_shared_prompt_forward_equals_separate_forwards[shared]",
           "test_logprob_y_given_x_runs_each_distinct_prompt_once"],
    "4": ["test_logprob_y_equals_hand_built_start_token_forward", "test_temperature_divides_logits_in_p_y",
        "test_logprob_y_gradient_equals_token_by_token_decoding", "test_logprob_y_memory_stays_flat_in_vocabulary_times_length"],
    "5": ["test_ppo_clip_loss_is_minus_advantage_at_ratio_one_and_clips_otherwise",
        "test_ppo_clip_with_ratios_below_and_above_one_and_asymmetric_clip", "test_ppo_clip_random_ratios_against_a_plain_python_oracle"],
    "6": ["test_token_mean_loss_hand_values", "test_token_mean_random_masks_against_a_plain_python_oracle"],
    "7": ["test_phase_for_step_warmup_boundary", "test_phase_record_holds_std_and_coefficient"],
    "8": ["test_pass_at_k_hand_values", "test_pass_at_k_random_against_subset_enumeration"],
}
POINTS = {"1": 10, "2": 5, "3a": 15, "3b": 5, "4": 15, "5": 15, "6": 10, "7": 10, "8": 15}  # the sheet's points
PART_NAMES = {"3a": "log-probs and gradients", "3b": "the prompt's forward shared"}  # what a part's points are for
# One thread per process: the tests are small, and on a busy machine torch's default threads fight for cores.
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
          "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ERROR_LINES = 8  # how much of an import or syntax error to show


def parts(only=None) -> list:
    """The graded parts of the chosen exercises (all by default), in the sheet's order -> [(part, number, name)]."""
    return [(part, n, name) for n, _, name, _ in EXERCISES if only is None or n in only
            for part in SPEC_TESTS if part.rstrip("ab") == str(n)]


def title(part: str, name: str) -> str:
    return f"exercise {part} {name}" + (f" ({PART_NAMES[part]})" if part in PART_NAMES else "")


# ---- The student's files ------------------------------------------------------------------------------------
def stage(dsrl_path: str, folder: str) -> dict:
    """Copy the files under test into folder -> {"dsrl", "missing_eval"}. Without the student's eval.py the
    tests import the reference eval.py with its exercises cut out (the test module needs one to import)."""
    student = os.path.dirname(os.path.abspath(dsrl_path))
    shutil.copy(dsrl_path, os.path.join(folder, "dsrl.py"))
    missing_eval = not os.path.isfile(os.path.join(student, "eval.py"))
    if missing_eval:
        with open(os.path.join(ROOT, "eval.py"), encoding="utf-8") as fh:
            cuts = {name: f"Exercise {n}: not graded" for n, f, name, _ in EXERCISES if f == "eval.py"}
            with open(os.path.join(folder, "eval.py"), "w", encoding="utf-8") as out:
                out.write(cut_bodies(fh.read(), cuts))
    else:
        shutil.copy(os.path.join(student, "eval.py"), os.path.join(folder, "eval.py"))
    for name in ("grader.py", "scale.py"):  # modules dsrl.py imports; not exercises, the project's will do
        source = os.path.join(student, name)
        shutil.copy(source if os.path.isfile(source) else os.path.join(ROOT, name), os.path.join(folder, name))
    return {"dsrl": os.path.join(folder, "dsrl.py"), "missing_eval": missing_eval}


def syntax_error(path: str):
    """The first lines of a syntax error in the file, or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            compile(fh.read(), os.path.basename(path), "exec")
    except SyntaxError as e:
        lines = [f"{type(e).__name__}: {e.msg} ({os.path.basename(path)}, line {e.lineno})"]
        return "\n".join(lines + ([f"    {e.text.rstrip()}"] if e.text else []))
    return None


# ---- One pytest process per exercise ------------------------------------------------------------------------
# Libraries every test process imports: on Linux they are imported once here and each exercise's process is
# forked from this one, which saves about 4 s of CPU per exercise. Third-party libraries only: nothing of the
# project is imported before the fork. Elsewhere (macOS, Windows) each exercise is a fresh `python -m pytest`.
PRELOAD = ["torch", "pyarrow.parquet", "safetensors", "sympy", "tokenizers", "transformers", "pytest"]
FORK = sys.platform.startswith("linux")


def preload():
    os.environ.update(PINNED)  # before torch starts its thread pools
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the test process will say what is missing
    try:
        from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: F401 (lazy modules)
    except ImportError:
        pass


def pytest_args(n: str, report: str) -> list:
    # no gc.collect() after each test (unraisableexception): with torch loaded it costs about 0.4 s a time
    return ["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", f"--junitxml={report}",
            *[f"{TESTS}::{name}" for name in SPEC_TESTS[n]]]


def launch(n: str, dsrl_path: str, folder: str) -> dict:
    """Start part n's pytest process -> {"report", "log", "poll": () -> exit code or None, "kill"}."""
    report, log = os.path.join(folder, f"report_{n}.xml"), os.path.join(folder, f"output_{n}.txt")
    # no third-party pytest plugins: loading (and assert-rewriting) them cost about 2 s per process
    env = {**PINNED, "DSRL_UNDER_TEST": dsrl_path, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    if not FORK:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args(n, report)],
                                    env={**os.environ, **env}, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
        return {"report": report, "log": log, "poll": proc.poll, "kill": lambda: (proc.kill(), proc.wait())}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: output to the log, run the tests, leave without running the parent's cleanup
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env)
            os.chdir(folder)
            sys.dont_write_bytecode = False  # keep pytest's rewritten test_dsrl.py (about 1 s) for the next process
            if "torch" in sys.modules:  # imported before the environment was pinned (a caller that imported torch)
                sys.modules["torch"].set_num_threads(1)
            import pytest
            code = int(pytest.main(pytest_args(n, report)))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def poll():
        done, status = os.waitpid(pid, os.WNOHANG)
        return None if done == 0 else os.waitstatus_to_exitcode(status)
    return {"report": report, "log": log, "poll": poll, "kill": lambda: (os.kill(pid, 9), os.waitpid(pid, 0))}


def error_lines(output: str) -> str:
    """The first lines of the error pytest printed for a module that does not import (its 'E   ' lines)."""
    lines = [line[4:] if line.startswith("E   ") else line for line in output.splitlines()
             if line.startswith("E   ") or line.strip().endswith("Error") or "Error: " in line]
    return "\n".join(dict.fromkeys(line.rstrip() for line in lines if line.strip()))


def exercise_failure(n: str, code: int, report: str, output: str):
    """None if every test of part n passed, else the first failure's message."""
    results = {}
    if os.path.exists(report):
        for case in ET.parse(report).iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if case.find("skipped") is not None:
                problem = case.find("skipped")  # a skipped spec test proves nothing
            results.setdefault(case.get("name"), []).append(
                None if problem is None else first_line(problem.get("message")))
    for name in SPEC_TESTS[n]:  # a name without [parameters] stands for every case of that test
        found = [m for case, ms in results.items() if name in (case, case.split("[")[0]) for m in ms]
        if not found:
            error = error_lines(output).splitlines()
            return f"the tests could not run: {error[-1]}" if error else f"{name} did not run (exit code {code})"
        bad = [m for m in found if m is not None]
        if bad:
            return bad[0]
    return None


def first_line(message) -> str:
    """The assertion's own message (or the exception), without pytest's expression dump."""
    text = (message or "failed").split("\nassert ")[0].strip()
    return " ".join(text.replace("AssertionError: ", "").split())[:240]


def run_exercises(dsrl_path: str, numbers: list, folder: str, timeout: float, jobs: int):
    """Run the parts' processes, at most `jobs` at a time -> ({n: None or message}, pytest output of each)."""
    if FORK and numbers:
        preload()
    waiting, running, failures, outputs = list(numbers), {}, {}, {}
    while waiting or running:
        while waiting and len(running) < jobs:
            n = waiting.pop(0)
            running[n] = {**launch(n, dsrl_path, folder), "t0": time.monotonic()}
        time.sleep(0.02)
        for n, job in list(running.items()):
            code = job["poll"]()
            if code is None and time.monotonic() - job["t0"] <= timeout:
                continue
            if code is None:
                job["kill"]()
                failures[n] = f"timed out after {timeout:.0f} s (an endless loop? --timeout S gives more time)"
            else:
                with open(job["log"], errors="replace") as fh:
                    outputs[n] = fh.read()
                failures[n] = exercise_failure(n, code, job["report"], outputs[n])
            del running[n]
    return failures, outputs


# ---- Grading ------------------------------------------------------------------------------------------------
def grade(dsrl_path: str, only=None, timeout: float = 300, jobs: int = 2, quiet: bool = False) -> list:
    """Grade one dsrl.py -> [(part, function name, None or failure message)]; prints the lines unless quiet."""
    chosen = parts(only)
    say = (lambda *a, **k: None) if quiet else print
    with tempfile.TemporaryDirectory(prefix="grade_") as folder:
        staged = stage(dsrl_path, folder)
        broken = {f: syntax_error(os.path.join(folder, f)) for f in ("dsrl.py", "eval.py")}
        broken = {f: e for f, e in broken.items() if e}
        in_eval = {n for n, f, _, _ in EXERCISES if f == "eval.py"}
        skip = {part for part, n, _ in chosen if n in in_eval and staged["missing_eval"]}
        run = [part for part, *_ in chosen if part not in skip] if not broken else []
        failures, outputs = run_exercises(staged["dsrl"], run, folder, timeout, jobs)
    for f, error in broken.items():
        say(f"error: {f} does not compile:\n{error}")
    import_errors = [m for m in failures.values() if m and m.startswith("the tests could not run")]
    if import_errors and len(import_errors) == len(run):  # the module does not import: show the error once
        first = next(o for o in outputs.values())
        say("error: the tests could not import your code:\n" + "\n".join(error_lines(first).splitlines()[:ERROR_LINES]))
    results = []
    for n, _, name in chosen:
        if n in skip:
            message = (f"not graded: no eval.py beside {dsrl_path}; put your eval.py in the same folder as "
                       "your dsrl.py")
        elif broken:
            message = f"{', '.join(broken)} does not compile: {next(iter(broken.values())).splitlines()[0]}"
        else:
            message = failures[n]
        say(f"{title(n, name)}: " + ("PASS" if message is None else f"FAIL ({message})"))
        results.append((n, name, message))
    say(f"score={sum(m is None for *_, m in results)}/{len(results)}")
    return results


def gradescope(results: list) -> dict:
    """Gradescope's results.json: a tests list (name, score, max_score, output), score, max_score, output."""
    tests = [{"name": title(n, name), "score": POINTS[n] if m is None else 0, "max_score": POINTS[n],
              "output": "PASS" if m is None else f"FAIL ({m})"} for n, name, m in results]
    passed = sum(m is None for *_, m in results)
    return {"score": sum(t["score"] for t in tests), "max_score": sum(t["max_score"] for t in tests),
            "output": f"{passed} of {len(results)} graded parts pass", "tests": tests}


def submission_file(folder: str):
    """The dsrl.py of one student's folder: at its top, or the only one below it."""
    if os.path.isfile(os.path.join(folder, "dsrl.py")):
        return os.path.join(folder, "dsrl.py")
    found = [os.path.join(d, "dsrl.py") for d, _, files in os.walk(folder) if "dsrl.py" in files]
    return found[0] if len(found) == 1 else None


def grade_submission(folder: str, only=None, timeout: float = 300, jobs: int = 2) -> list:
    """Grade the dsrl.py of one submission folder quietly (a FAIL for every part without exactly one dsrl.py)."""
    path = submission_file(folder)
    if path is None:
        return [(part, name, "no dsrl.py (or more than one) in the folder") for part, _, name in parts(only)]
    return grade(path, only, timeout, jobs, quiet=True)


def grade_all(folder: str, only, timeout: float, jobs: int) -> dict:
    """Grade every sub-folder of folder (one per student); prints one row per student -> {student: results.json}."""
    print("\t".join(["student"] + [f"ex{part}" for part, *_ in parts(only)] + ["points", "score"]))
    everyone = {}
    for student in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))):
        results = grade_submission(os.path.join(folder, student), only, timeout, jobs)
        everyone[student] = gradescope(results)
        marks = ["PASS" if m is None else "FAIL" for *_, m in results]
        print("\t".join([student] + marks + [f"{everyone[student]['score']}/{everyone[student]['max_score']}",
                                             f"{marks.count('PASS')}/{len(marks)}"]), flush=True)
    return everyone


def parse_args(argv):
    p = argparse.ArgumentParser(description="Grade a student's dsrl.py (and the eval.py beside it) offline on CPU")
    p.add_argument("dsrl", nargs="?", help="the student's dsrl.py")
    p.add_argument("--only", type=int, nargs="+", metavar="N", help="grade only these exercises")
    p.add_argument("--json", metavar="PATH", help="write the results in Gradescope's results.json format")
    p.add_argument("--all", metavar="DIR", help="grade every sub-folder of DIR (one per student) instead")
    p.add_argument("--timeout", type=float, default=300, help="seconds per exercise before it FAILs")
    p.add_argument("--jobs", type=int, default=2, help="exercises graded at the same time")
    a = p.parse_args(argv)
    if (a.dsrl is None) == (a.all is None):
        p.error("give either PATH/TO/dsrl.py or --all DIR, e.g. python course/grade.py student/dsrl.py")
    if a.dsrl is not None and not os.path.isfile(a.dsrl):
        p.error(f"{a.dsrl} is not a file: give the path of the student's dsrl.py")
    if a.all is not None and not os.path.isdir(a.all):
        p.error(f"{a.all} is not a folder: --all takes a folder with one sub-folder per student")
    unknown = set(a.only or []) - {n for n, *_ in EXERCISES}
    if unknown:
        p.error(f"--only {sorted(unknown)}: there is no such exercise; choose from 1 to {len(EXERCISES)}")
    if a.timeout <= 0 or a.jobs < 1:
        p.error("--timeout must be > 0 and --jobs >= 1")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("pytest") is None:
        print(f"error: pytest is not installed for {sys.executable}, and the grader runs the tests with it: "
              f"{sys.executable} -m pip install pytest", file=sys.stderr)
        return 2
    if a.all is not None:
        everyone = grade_all(a.all, a.only, a.timeout, a.jobs)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(everyone, fh, indent=2)
        return 0
    results = grade(a.dsrl, a.only, a.timeout, a.jobs)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(gradescope(results), fh, indent=2)
    return 0 if all(m is None for *_, m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
