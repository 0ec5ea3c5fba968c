"""python course/make_exercises.py OUT_DIR: a student copy of the project with the exercise bodies cut out.

The exercises are cut from the reference files at run time with `ast`, so they can never drift from them: each
exercise function keeps its signature and docstring, and its body becomes `raise NotImplementedError(...)`.
Everything else (grader.py, the tests, the course kit, the test data) is copied unchanged.
Grade a copy with: python course/grade.py OUT_DIR/dsrl.py
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
COPIED = ["grader.py", "scale.py", "test_dsrl.py", "requirements.txt", "testdata", "course"]


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
    for name in COPIED:
        src, dst = os.path.join(ROOT, name), os.path.join(out_dir, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "plots"))
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
    print(f"wrote the student copy to {argv[0]}: {len(EXERCISES)} exercises; grade it with "
          f"python {os.path.join(argv[0], 'course', 'grade.py')} {os.path.join(argv[0], 'dsrl.py')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
