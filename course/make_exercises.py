"""python course/make_exercises.py OUT_DIR: a student copy of the project with the exercise bodies cut out.

The exercises are cut from the reference files at run time with `ast`, so they can never drift from them: each
exercise function keeps its signature and docstring, and its body becomes `raise NotImplementedError(...)`.
The copy holds what a student needs and nothing of the instructor's: the root README (the paper-to-code map),
grader.py, the tests, the test data, bench/README.md, pytest.ini if there is one, and of course/ the student sheet
(ASSIGNMENT.md), the write-up template, the grader and the experiment scripts (STUDENT_FILES). The instructor guide
with the reference outcomes and explanations (course/INSTRUCTOR.md), the rubric, the Gradescope scripts, the plots
and the kit's own tests stay behind. The copy's test_dsrl.py leaves out the tests of the repository's own shape
(REFERENCE_ONLY_TESTS), so that its pytest passes with any correct solution and fails only on the exercises.
Grade a copy with: python OUT_DIR/course/grade.py OUT_DIR/dsrl.py
"""
import ast
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (number, file, function, what to implement): the paper's objects, in the order of the assignment sheet
EXERCISES = [
    (1, "dsrl.py", "group_advantages", "A = r - group mean, divided by (unbiased group std + 1e-6) when use_std"),
    (2, "dsrl.py", "sample_mask", "NSR keeps A < 0, PSR keeps A > 0, 'all' keeps every sample"),
    (3, "dsrl.py", "logprob_y_given_x", "log pi(y_t | x, y_<t) per response token, and the response mask"),
    (4, "dsrl.py", "logprob_y", "log pi(y_t | <|im_start|>, y_<t): the prompt replaced by one start token"),
    (5, "dsrl.py", "ppo_clip_loss", "per-token PPO clipped surrogate with the dual clip for A < 0"),
    (6, "dsrl.py", "token_mean_loss", "sum of the kept tokens' losses / the step's number of kept tokens"),
    (7, "dsrl.py", "phase_for_step", "the DSRL schedule: NSR-PreRL for steps 1..W, then GRPO (W = D - 1)"),
    (8, "eval.py", "pass_at_k", "the unbiased pass@k estimator from n samples with c right"),
]
# Copied (paths from the project root; a missing optional one is skipped; test_dsrl.py and README.md as
# student_text gives them). An allow-list, so that a new instructor file cannot reach the students by accident.
STUDENT_FILES = ["README.md", "REPRODUCE.md", ".gitignore", "grader.py", "scale.py", "test_dsrl.py", "test_grader.py",
                 "requirements.txt", "testdata", "bench/README.md", "course/ASSIGNMENT.md", "course/WRITEUP.md", "course/grade.py",
                 "course/make_exercises.py", "course/tiny_task.py", "course/run_experiments.sh", "course/summarize.py",
                 "course/run_junk_experiment.sh", "course/junk_summary.py"]
OPTIONAL = {"pytest.ini"}  # the root pytest configuration (markers), when the project has one
INSTRUCTOR_ONLY = ["course/INSTRUCTOR.md", "course/RUBRIC.md", "course/gradescope", "course/test_course.py",
                   "course/*.png"]  # never copied (test_course.py checks)
# Tests of the repository rather than of the method: CI's script and the benchmarks' scripts (not copied: one holds
# exercise 3's cache lines) and the reference's line budget (a student's solution may be longer). Left out of the
# copy's test_dsrl.py; none of them is a spec test of the grader.
REFERENCE_ONLY_TESTS = ["test_readme_install_and_test_lines_are_what_ci_runs",
                        "test_dsrl_reads_in_the_papers_order_and_stays_short",
                        "test_gpu_check_tiny_mode_writes_every_section",
                        "test_trainer_and_gpu_check_need_neither_pytest_nor_pyarrow_for_a_jsonl_dataset",
                        "test_gpu_check_keeps_the_rows_of_a_section_that_crashes",
                        "test_reward_agreement_bench_scores_labelled_cases_it_is_given"]
# The copy's README runs the tests the copy has (course/test_course.py stays with the instructor)
README_IN_COPY = [("test_dsrl.py test_grader.py course/test_course.py   #", "test_dsrl.py test_grader.py   #")]


def cut_bodies(source: str, cuts: dict) -> str:
    """Replace the body of each function named in `cuts` (name -> message) by one raise; keep its docstring."""
    lines = source.splitlines(keepends=True)
    functions = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in cuts]
    missing = set(cuts) - {f.name for f in functions}
    if missing:
        raise SystemExit(f"error: {', '.join(sorted(missing))} not found as top-level functions; the reference changed")
    for fn in sorted(functions, key=lambda f: -f.lineno):  # bottom-up, so earlier line numbers stay valid
        has_doc = isinstance(fn.body[0], ast.Expr) and isinstance(getattr(fn.body[0], "value", None), ast.Constant)
        start = fn.body[0].end_lineno if has_doc else fn.body[0].lineno - 1  # everything after the docstring goes
        indent = " " * fn.body[0].col_offset
        lines[start:fn.end_lineno] = [f"{indent}raise NotImplementedError({cuts[fn.name]!r})\n"]
    return "".join(lines)


def drop_functions(source: str, names: list) -> str:
    """Remove the top-level functions named (with their decorators and the blank lines after them); a name that
    is not there is skipped (a copy made from a copy; test_course.py checks that the reference has them all)."""
    lines = source.splitlines(keepends=True)
    functions = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in names]
    for fn in sorted(functions, key=lambda f: -f.lineno):
        start, end = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1, fn.end_lineno
        while end < len(lines) and not lines[end].strip():
            end += 1
        del lines[start:end]
    return "".join(lines)


def student_text(name: str, text: str) -> str:
    """What the copy receives of a copied text file: the tests without REFERENCE_ONLY_TESTS, the README's test line
    without the instructor's tests."""
    if name == "test_dsrl.py":
        return drop_functions(text, REFERENCE_ONLY_TESTS)
    if name == "README.md":
        for old, new in README_IN_COPY:
            if text.count(old) != 1 and new not in text:  # (in a copy made from a copy, the new text is there)
                raise SystemExit(f"error: README.md no longer holds {old!r} once; update README_IN_COPY")
            text = text.replace(old, new)
    return text


def make_copy(out_dir: str) -> list:
    """Write the student copy into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for filename in sorted({f for _, f, _, _ in EXERCISES}):
        cuts = {name: f"Exercise {n}: {what}" for n, f, name, what in EXERCISES if f == filename}
        with open(os.path.join(ROOT, filename), encoding="utf-8") as fh:
            source = cut_bodies(fh.read(), cuts)
        compile(source, filename, "exec")  # the copy must import
        with open(os.path.join(out_dir, filename), "w", encoding="utf-8") as fh:
            fh.write(source)
        written.append(os.path.join(out_dir, filename))
    for name in STUDENT_FILES + sorted(OPTIONAL):
        src, dst = os.path.join(ROOT, name), os.path.join(out_dir, name)
        if name in OPTIONAL and not os.path.exists(src):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "plots"))
        elif name in ("test_dsrl.py", "README.md"):
            with open(src, encoding="utf-8") as fh, open(dst, "w", encoding="utf-8") as out:
                out.write(student_text(name, fh.read()))
        else:
            shutil.copy2(src, dst)
        written.append(dst)
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python course/make_exercises.py OUT_DIR", file=sys.stderr)
        return 2
    if os.path.abspath(argv[0]) == ROOT:
        print("error: OUT_DIR is the reference project itself; choose another folder", file=sys.stderr)
        return 2
    make_copy(argv[0])
    print(f"wrote the student copy to {argv[0]}: {len(EXERCISES)} exercises, sheet course/ASSIGNMENT.md; grade it with "
          f"python {os.path.join(argv[0], 'course', 'grade.py')} {os.path.join(argv[0], 'dsrl.py')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
