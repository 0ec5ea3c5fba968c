"""Tests of the course kit itself (instructor side; not copied to students): the copy, the grader, the task.

    python -m pytest -q course/test_course.py              # all (about 4 minutes on 2 cores)
    python -m pytest -q course/test_course.py -m "not slow"

Offline and on CPU. The grader tests plant one known defect in a copy of the reference files (an endless loop,
a syntax error, a missing eval.py...) and check the grader's verdict and message.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the runs below: on a busy 2-core machine two threads crawl
HANG_S = 3600  # the limit of every subprocess: it catches a hang, never a slow machine
sys.path.insert(0, HERE)
import grade  # noqa: E402
import make_exercises as kit  # noqa: E402

N = len(kit.EXERCISES)


def run_grade(*args, grade_py=os.path.join(HERE, "grade.py"), timeout=HANG_S):
    return subprocess.run([sys.executable, grade_py, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def student(folder, dsrl_source=None, eval_source=None, with_eval=True):
    """A submission folder: the reference files, with dsrl.py / eval.py replaced by the given sources."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(ROOT, "dsrl.py")) as fh:
        (folder / "dsrl.py").write_text(dsrl_source if dsrl_source is not None else fh.read())
    if with_eval:
        with open(os.path.join(ROOT, "eval.py")) as fh:
            (folder / "eval.py").write_text(eval_source if eval_source is not None else fh.read())
    shutil.copy(os.path.join(ROOT, "grader.py"), folder / "grader.py")
    return folder / "dsrl.py"


def reference(name):
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def copy_text_files(folder):
    """{relative path: text} of every file of the copy that reads as UTF-8 text."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    out[os.path.relpath(path, folder)] = fh.read()
            except UnicodeDecodeError:
                out[os.path.relpath(path, folder)] = ""
    return out


# ---- The copy -----------------------------------------------------------------------------------------------
def test_student_copy_holds_no_instructor_material(tmp_path):
    kit.make_copy(str(tmp_path / "copy"))
    files = copy_text_files(tmp_path / "copy")
    names = {os.path.basename(p) for p in files}
    assert not {"INSTRUCTOR.md", "test_course.py"} & names and not any(p.endswith(".png") for p in files), sorted(files)
    assert {"README.md", "course/ASSIGNMENT.md", "course/grade.py", "course/tiny_task.py", "test_dsrl.py",
            "eval.py", "dsrl.py"} <= set(files), sorted(files)
    guide = reference("course/INSTRUCTOR.md")
    sheet = files["course/ASSIGNMENT.md"]
    # every sentence-long line of the guide that the sheet does not share (the outcomes, the explanations)
    prose = re.sub(r"```.*?```", "", guide, flags=re.S)  # commands are shared with the README; prose is not
    own_lines = {line.strip() for line in prose.splitlines() if len(line.strip()) >= 40
                 and not line.lstrip().startswith(("python ", "bash ", "--", "#"))}
    own_lines -= {line.strip() for line in sheet.splitlines()}
    numbers = set(re.findall(r"\b\d\.\d{3}\b", prose))  # the reference outcomes (0.966, +0.572, ...)
    assert len(own_lines) > 30 and len(numbers) >= 15  # the guide has outcomes to leak
    for path, text in files.items():
        leaked = [line for line in own_lines if line in text]
        assert not leaked, f"{path} holds instructor-only text: {leaked[0]!r}"
        if path.endswith((".md", ".sh")) or path.startswith("course/"):
            found = sorted(n for n in numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", text))
            assert not found, f"{path} holds reference outcomes {found[:5]}"
    for path, text in files.items():  # every file the copy names under course/ is in it (bar the guide's name where
        allowed = set(kit.INSTRUCTOR_ONLY) if path in ("README.md", "course/make_exercises.py") else set()  # left out
        for ref in set(re.findall(r"course/[\w.]+\.(?:md|py|sh|png)", text)) - allowed:
            assert ref in files, f"{path} points to {ref}, which is not in the copy"


def test_student_copy_takes_pytest_ini_when_there_is_one(tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "pytest.ini"))
    monkeypatch.setattr(kit, "ROOT", str(project))
    kit.make_copy(str(tmp_path / "without"))
    assert not (tmp_path / "without" / "pytest.ini").exists()
    (project / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: a long test\n")
    kit.make_copy(str(tmp_path / "with"))
    assert (tmp_path / "with" / "pytest.ini").read_text() == (project / "pytest.ini").read_text()


@pytest.mark.slow
def test_copy_grades_itself_with_its_own_grader(tmp_path):
    kit.make_copy(str(tmp_path / "copy"))
    res = run_grade(tmp_path / "copy" / "dsrl.py", grade_py=tmp_path / "copy" / "course" / "grade.py")
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 1 and lines[-1] == f"score=0/{N}", res.stdout + res.stderr
    for (n, _, name, _), line in zip(kit.EXERCISES, lines):
        assert line.startswith(f"exercise {n} {name}: FAIL (NotImplementedError: Exercise {n}:"), line


# ---- The grader ---------------------------------------------------------------------------------------------
def test_grader_shows_a_syntax_error_and_fails_every_exercise(tmp_path, capsys):
    source = reference("dsrl.py") + "\nif True print('a missing colon')\n"
    path = student(tmp_path / "s", source)
    results = grade.grade(str(path), only=[1, 2])
    out = capsys.readouterr().out
    assert [m is None for *_, m in results] == [False, False]
    line = len(source.splitlines())
    assert f"error: dsrl.py does not compile:\nSyntaxError: invalid syntax (dsrl.py, line {line})\n" \
           "    if True print('a missing colon')\n" in out, out
    assert "exercise 1 group_advantages: FAIL (dsrl.py does not compile: SyntaxError" in out and "score=0/2" in out


def test_grader_names_a_missing_pytest(tmp_path, monkeypatch, capsys):
    real = grade.importlib.util.find_spec
    monkeypatch.setattr(grade.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest" else real(name, *a))
    assert grade.main([os.path.join(ROOT, "dsrl.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytest is not installed" in err[0] and "pip install pytest" in err[0], err


def test_grader_usage_errors_are_one_line_and_exit_2(tmp_path):
    for args in ([tmp_path / "nope.py"], ["--all", tmp_path / "nope"], [os.path.join(ROOT, "dsrl.py"), "--only", "9"]):
        res = run_grade(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("grade.py: error: "), res.stderr


def test_gradescope_json_adds_up_the_sheet_points():
    results = [(n, name, None if n % 2 else "wrong") for n, _, name, _ in kit.EXERCISES]
    out = grade.gradescope(results)
    assert [t["max_score"] for t in out["tests"]] == [grade.POINTS[n] for n, *_ in kit.EXERCISES]
    assert out["max_score"] == 100 and out["score"] == sum(grade.POINTS[n] for n, *_ in kit.EXERCISES if n % 2)
    assert out["tests"][1] == {"name": "exercise 2 sample_mask", "score": 0, "max_score": grade.POINTS[2],
                               "output": "FAIL (wrong)"}
    sheet = reference("course/ASSIGNMENT.md")  # the sheet states the same points
    for n, _, name, _ in kit.EXERCISES:
        assert re.search(rf"### {n}\. `{name}\(.*\({grade.POINTS[n]} points\)", sheet), n


@pytest.mark.slow
def test_grader_json_and_a_wrong_solution(tmp_path):
    bug = reference("dsrl.py") + "\n\ndef sample_mask(adv, samples):  # NSR as 'reward 0'\n    return adv <= 0\n"
    path = student(tmp_path / "s", bug)
    res = run_grade(path, "--only", 1, 2, "--json", tmp_path / "r.json")
    assert res.returncode == 1 and res.stdout.strip().splitlines() == [
        "exercise 1 group_advantages: PASS", res.stdout.strip().splitlines()[1], "score=1/2"], res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[1].startswith("exercise 2 sample_mask: FAIL (")
    out = json.loads((tmp_path / "r.json").read_text())
    assert (out["score"], out["max_score"]) == (grade.POINTS[1], grade.POINTS[1] + grade.POINTS[2])
    assert [t["score"] for t in out["tests"]] == [grade.POINTS[1], 0] and out["tests"][1]["output"].startswith("FAIL (")


@pytest.mark.slow
def test_grader_fails_an_endless_loop_after_the_time_limit(tmp_path):
    loop = reference("dsrl.py") + "\n\ndef group_advantages(rewards, group_size, use_std):\n    while True:\n" \
        "        pass\n"
    res = run_grade(student(tmp_path / "s", loop), "--only", 1, 2, "--timeout", 20)
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("exercise 1 group_advantages: FAIL (timed out after 20 s"), res.stdout + res.stderr
    assert lines[1:] == ["exercise 2 sample_mask: PASS", "score=1/2"], res.stdout


@pytest.mark.slow
def test_grader_shows_an_import_error_once(tmp_path):
    broken = reference("dsrl.py").replace("import torch\n", "import torch\nimport a_module_that_is_not_there\n", 1)
    res = run_grade(student(tmp_path / "s", broken), "--only", 1, 2)
    lines = res.stdout.strip().splitlines()
    assert res.stdout.count("No module named 'a_module_that_is_not_there'") >= 2, res.stdout  # the error, each line
    assert lines[0] == "error: the tests could not import your code:", res.stdout
    assert lines[-3].startswith("exercise 1 group_advantages: FAIL (the tests could not run: ")
    assert lines[-1] == "score=0/2"


@pytest.mark.slow
def test_grader_uses_the_students_eval_and_needs_it(tmp_path):
    head = "def pass_at_k(n: int, c: int, k: int) -> float:"
    biased = reference("eval.py").replace(head, head + "\n    return 1 - (1 - c / n) ** k", 1)  # the biased estimator
    res = run_grade(student(tmp_path / "biased", eval_source=biased), "--only", 8)
    assert res.stdout.strip().splitlines()[-1] == "score=0/1" and "pass_at_k: FAIL (" in res.stdout, res.stdout
    res = run_grade(student(tmp_path / "bare", with_eval=False), "--only", 1, 8)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "exercise 1 group_advantages: PASS", res.stdout + res.stderr  # the tests import without it
    assert lines[1].startswith("exercise 8 pass_at_k: FAIL (not graded: no eval.py beside ") and lines[2] == "score=1/2"


@pytest.mark.slow
def test_grader_all_grades_a_folder_of_submissions(tmp_path):
    student(tmp_path / "subs" / "alice")
    student(tmp_path / "subs" / "bob" / "nested", reference("dsrl.py") + "\n\ndef sample_mask(adv, samples):\n"
                                                  "    return adv < 0\n")
    (tmp_path / "subs" / "carol").mkdir()
    res = run_grade("--all", tmp_path / "subs", "--only", 1, 2, "--json", tmp_path / "all.json")
    assert res.returncode == 0, res.stderr
    p1, p2 = grade.POINTS[1], grade.POINTS[2]
    assert res.stdout.strip().splitlines() == [
        "student\tex1\tex2\tpoints\tscore", f"alice\tPASS\tPASS\t{p1 + p2}/{p1 + p2}\t2/2",
        f"bob\tPASS\tFAIL\t{p1}/{p1 + p2}\t1/2", f"carol\tFAIL\tFAIL\t0/{p1 + p2}\t0/2"], res.stdout
    out = json.loads((tmp_path / "all.json").read_text())
    assert sorted(out) == ["alice", "bob", "carol"] and "no dsrl.py" in out["carol"]["tests"][0]["output"]


# ---- The junk variant of the CPU task -------------------------------------------------------------------------
@pytest.mark.slow
def test_junk_variant_start_model_answers_junk_in_both_spaces(tmp_path):
    """tiny_task --junk 0.5 --answers-alone 0.25: about half of the start model's answers are the empty box, given
    the prompt and without it."""
    import tiny_task
    built = tiny_task.build_task(str(tmp_path / "junk"), seed=0, p_junk=0.5, p_alone=0.25)
    start = built["start"]
    assert 0.3 <= start["train"]["p_junk"] <= 0.8 and 0.3 <= start["marginal"]["p_junk"] <= 0.8, start
    assert start["train"]["p_format"] + start["train"]["p_junk"] > 0.9, start  # the rest are boxed digits
    res = subprocess.run([sys.executable, os.path.join(HERE, "tiny_task.py"), tmp_path / "bad", "--junk", "1.5"],
                         capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 2 and "--junk 1.5: give a share in [0, 1)" in res.stderr, res.stderr


@pytest.mark.slow
def test_grader_without_fork_runs_fresh_processes(tmp_path, monkeypatch, capsys):
    """The path of macOS and Windows: each exercise in a fresh `python -m pytest`."""
    monkeypatch.setattr(grade, "FORK", False)
    bug = reference("dsrl.py").replace("def sample_mask(", "def sample_mask_unused(", 1) + \
        "\n\ndef sample_mask(adv, samples):\n    return {'neg': adv < 0, 'pos': adv >= 0, 'all': adv == adv}[samples]\n"
    results = grade.grade(os.path.join(ROOT, "dsrl.py"), only=[1, 2])
    assert [m for *_, m in results] == [None, None], capsys.readouterr().out
    results = grade.grade(str(student(tmp_path / "s", bug)), only=[2])  # PSR as A >= 0
    assert results[0][2] is not None and capsys.readouterr().out.strip().endswith("score=0/1")
