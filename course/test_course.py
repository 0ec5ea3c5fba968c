"""Tests of the course kit itself (instructor side; not copied to students): the copy, the grader, the task.

    python -m pytest -q course/test_course.py              # all (about 4 minutes on 2 cores)
    python -m pytest -q course/test_course.py -m "not slow"

Offline and on CPU. The grader tests plant one known defect in a copy of the reference files (an endless loop,
a syntax error, a missing eval.py...) and check the grader's verdict and message.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

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
    assert not {"INSTRUCTOR.md", "RUBRIC.md", "test_course.py", "setup.sh", "run_autograder"} & names and not any(
        p.endswith(".png") for p in files), sorted(files)
    assert {"README.md", "course/ASSIGNMENT.md", "course/grade.py", "course/tiny_task.py", "test_dsrl.py",
            "eval.py", "dsrl.py"} <= set(files), sorted(files)
    guide = reference("course/INSTRUCTOR.md") + "\n" + reference("course/RUBRIC.md")
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
        # bench/README.md's timings (0.148 s, ...) are the repository's own and meet the guide's numbers by chance
        if (path.endswith((".md", ".sh")) or path.startswith("course/")) and not path.startswith("bench/"):
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
    assert res.returncode == 1 and lines[-1] == f"score=0/{len(grade.parts())}", res.stdout + res.stderr
    for (part, n, name), line in zip(grade.parts(), lines):
        assert line.startswith(f"{grade.title(part, name)}: FAIL (NotImplementedError: Exercise {n}:"), line


# ---- The copy holds nothing of the cut bodies -----------------------------------------------------------------
# A piece of a cut body counts when it has at least MIN_CHARS characters that are not whitespace: every physical
# line (its code and its comment apart), and every expression inside the body of at least MIN_EXPR characters (so
# that a fragment such as `ratio.clamp(1 - clip_low, 1 + clip_high)` counts too). Shorter pieces are the trivial
# ones: `if use_std:`, `return 1.0`, `rows = {}`, `use_cache=True)`, brackets and blank lines. A piece is found in
# a file when it appears there with all whitespace removed from both, so reflowed or indented copies count.
MIN_CHARS, MIN_EXPR = 16, 24
GIVEN = {  # pieces the copy holds on purpose: code the student is handed, not an answer
    "device = next(model.parameters()).device": "the other functions of dsrl.py and eval.py begin so too",
    "next(model.parameters()).device": "the same line's expressions",
    "next(model.parameters())": "the same line's expressions",
    "checkpointed_layers(model, checkpointing)": "the sheet gives the checkpointing context (not graded)",
}


def squash(text):
    return re.sub(r"\s+", "", text)


def cut_body_pieces():
    """[(exercise, piece)] of every cut body of the reference, as defined above."""
    pieces = []
    for n, filename, name, _ in kit.EXERCISES:
        source = reference(filename)
        fn = next(f for f in ast.parse(source).body if isinstance(f, ast.FunctionDef) and f.name == name)
        body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
        for line in source.splitlines()[body[0].lineno - 1:fn.end_lineno]:
            code, comment = (line.split("  #", 1) + [""])[:2] if not line.strip().startswith("#") else ("", line)
            pieces += [(n, p.strip()) for p in (code, comment.strip().lstrip("#")) if len(squash(p)) >= MIN_CHARS]
        pieces += [(n, ast.get_source_segment(source, node)) for stmt in body for node in ast.walk(stmt)
                   if isinstance(node, ast.expr) and len(squash(ast.get_source_segment(source, node))) >= MIN_EXPR]
    return pieces


def test_student_copy_holds_no_line_of_the_cut_bodies(tmp_path):
    """Every line of every cut body (and every longer expression in it), against every file of the copy."""
    kit.make_copy(str(tmp_path / "copy"))
    files = {path: squash(text) for path, text in copy_text_files(tmp_path / "copy").items()}
    pieces = cut_body_pieces()
    assert len(pieces) > 60 and {n for n, _ in pieces} == {n for n, *_ in kit.EXERCISES}, pieces
    leaks = sorted({(path, n, piece) for n, piece in pieces if piece not in GIVEN
                    for path, text in files.items() if squash(piece) in text})
    assert not leaks, "reference code in the student copy:\n" + "\n".join(f"{p}: exercise {n}: {x}" for p, n, x in leaks)
    still_given = {piece for _, piece in pieces if any(squash(piece) in text for text in files.values())}
    assert still_given == set(GIVEN), f"GIVEN lists pieces the copy no longer holds: {set(GIVEN) - still_given}"


def test_every_relative_link_in_the_copys_markdown_resolves(tmp_path):
    kit.make_copy(str(tmp_path / "copy"))
    checked = 0
    for path in copy_text_files(tmp_path / "copy"):
        if not path.endswith(".md"):
            continue
        text = (tmp_path / "copy" / path).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor of the page itself
            checked += 1
            where = os.path.normpath(os.path.join(tmp_path / "copy", os.path.dirname(path), target.split("#")[0]))
            assert os.path.exists(where), f"{path} links to {target}, which the copy does not have"
    assert checked >= 3  # README's links to the sheet and to bench/README.md


def test_copy_tests_name_only_files_the_copy_has(tmp_path, monkeypatch):
    """Every project file the copy's tests open by name (os.path.join(HERE, ...)) is in the copy; the tests of the
    repository's own shape (REFERENCE_ONLY_TESTS) are not, and nothing else is left out."""
    kit.make_copy(str(tmp_path / "copy"))
    opened = []
    for name in ("test_dsrl.py", "test_grader.py"):
        text = (tmp_path / "copy" / name).read_text()
        for args in re.findall(r"os\.path\.join\(HERE, ((?:\"[^\"]+\",\s*)*\"[^\"]+\")\)", text):
            opened.append(os.path.join(*re.findall(r'"([^"]+)"', args)))
            path = opened[-1]
            assert path.startswith("..") or (tmp_path / "copy" / path).exists(), f"{name} opens {path}, not in the copy"
    assert len(opened) >= 8, opened  # ../shared is outside any project: those tests skip without it
    ours, theirs = (set(re.findall(r"^def (test_\w+)", (d / "test_dsrl.py").read_text(), re.M))
                    for d in (Path(ROOT), tmp_path / "copy"))
    assert ours - theirs == set(kit.REFERENCE_ONLY_TESTS) and theirs <= ours
    readme = (tmp_path / "copy" / "README.md").read_text()  # its test line runs the tests the copy has
    assert all(new in readme and old not in readme for old, new in kit.README_IN_COPY)
    monkeypatch.setattr(kit, "ROOT", str(tmp_path / "copy"))  # a copy of the copy (its own course test makes one)
    kit.make_copy(str(tmp_path / "copy2"))
    for name in ("README.md", "test_dsrl.py", "dsrl.py", "eval.py"):
        assert (tmp_path / "copy2" / name).read_text() == (tmp_path / "copy" / name).read_text(), name
    assert not set(kit.REFERENCE_ONLY_TESTS) & {t for tests in grade.SPEC_TESTS.values() for t in tests}


def junit_failures(report):
    """{test id: failure message} of a pytest --junitxml report, and the number of tests it ran."""
    cases = list(ET.parse(report).iter("testcase"))
    failed = {c.get("name"): (c.find("failure") if c.find("failure") is not None else c.find("error")).get("message")
              for c in cases if c.find("failure") is not None or c.find("error") is not None}
    return failed, len(cases)


@pytest.mark.slow
def test_copy_pytest_passes_with_a_solution_and_fails_only_on_the_exercises(tmp_path):
    """The copy's own pytest (quick tier, and the course test that grades the copy with its own kit): with the
    exercises empty every failure is an exercise's NotImplementedError; with a correct solution that is longer
    than the reference (a student's comments), nothing fails."""
    copy = tmp_path / "copy"
    kit.make_copy(str(copy))

    def copy_pytest(report, *extra):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                               *extra], capture_output=True, text=True, timeout=1800, cwd=copy,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "DSRL_UNDER_TEST": ""})
    copy_pytest(tmp_path / "empty.xml", "-m", "not slow", "test_dsrl.py", "test_grader.py")
    failed, ran = junit_failures(tmp_path / "empty.xml")
    assert ran > 100 and failed, ran
    others = {t: m for t, m in failed.items() if "NotImplementedError: Exercise" not in (m or "")}
    assert not others, f"failures in the empty copy that are not an exercise's: {others}"
    solution = reference("dsrl.py").replace('    """A_i = r_i - mean_g r,', "    # my notes\n" * 20 + '    """A_i = r_i - mean_g r,')
    (copy / "dsrl.py").write_text(solution)  # 20 lines longer than the reference
    shutil.copy(os.path.join(ROOT, "eval.py"), copy / "eval.py")
    res = copy_pytest(tmp_path / "solved.xml", "test_dsrl.py", "test_grader.py", "-k",
                      "not slow or test_course_reference_scores_full_and_the_exercise_copy_zero")
    failed, ran = junit_failures(tmp_path / "solved.xml")
    assert ran > 100 and not failed, (failed, res.stdout[-2000:])


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


def test_instructor_numbers_name_their_library_versions():
    """The reference outcomes depend on the versions of torch and transformers (random streams, kernels)."""
    guide = reference("course/INSTRUCTOR.md")
    for library in ("torch", "transformers", "tokenizers", "Python"):
        assert re.search(rf"{library} \d+\.\d+\.\d+", guide), f"INSTRUCTOR.md does not name the {library} version"


def test_gradescope_json_adds_up_the_sheet_points():
    results = [(part, name, None if n % 2 else "wrong") for part, n, name in grade.parts()]
    out = grade.gradescope(results)
    assert [t["max_score"] for t in out["tests"]] == [grade.POINTS[part] for part, *_ in grade.parts()]
    assert out["max_score"] == 100 and out["score"] == sum(grade.POINTS[p] for p, n, _ in grade.parts() if n % 2)
    assert out["tests"][1] == {"name": "exercise 2 sample_mask", "score": 0, "max_score": grade.POINTS["2"],
                               "output": "FAIL (wrong)"}
    assert [t["name"] for t in out["tests"]][2:4] == ["exercise 3a logprob_y_given_x (log-probs and gradients)",
                                                      "exercise 3b logprob_y_given_x (the prompt's forward shared)"]
    sheet = reference("course/ASSIGNMENT.md")  # the sheet states the same points, and exercise 3's split
    for n, _, name, _ in kit.EXERCISES:
        total = sum(grade.POINTS[p] for p, m, _ in grade.parts() if m == n)
        assert re.search(rf"### {n}\. `{name}\(.*\({total} points\)", sheet), n
    assert f"**3a ({grade.POINTS['3a']} points)" in sheet and f"**3b ({grade.POINTS['3b']} points)" in sheet


@pytest.mark.slow
def test_grader_json_and_a_wrong_solution(tmp_path):
    bug = reference("dsrl.py") + "\n\ndef sample_mask(adv, samples):  # NSR as 'reward 0'\n    return adv <= 0\n"
    path = student(tmp_path / "s", bug)
    res = run_grade(path, "--only", 1, 2, "--json", tmp_path / "r.json")
    assert res.returncode == 1 and res.stdout.strip().splitlines() == [
        "exercise 1 group_advantages: PASS", res.stdout.strip().splitlines()[1], "score=1/2"], res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[1].startswith("exercise 2 sample_mask: FAIL (")
    out = json.loads((tmp_path / "r.json").read_text())
    assert (out["score"], out["max_score"]) == (grade.POINTS["1"], grade.POINTS["1"] + grade.POINTS["2"])
    assert [t["score"] for t in out["tests"]] == [grade.POINTS["1"], 0] and out["tests"][1]["output"].startswith("FAIL (")


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
    p1, p2 = grade.POINTS["1"], grade.POINTS["2"]
    assert res.stdout.strip().splitlines() == [
        "student\tex1\tex2\tpoints\tscore", f"alice\tPASS\tPASS\t{p1 + p2}/{p1 + p2}\t2/2",
        f"bob\tPASS\tFAIL\t{p1}/{p1 + p2}\t1/2", f"carol\tFAIL\tFAIL\t0/{p1 + p2}\t0/2"], res.stdout
    out = json.loads((tmp_path / "all.json").read_text())
    assert sorted(out) == ["alice", "bob", "carol"] and "no dsrl.py" in out["carol"]["tests"][0]["output"]


# Plausible wrong solutions, each planted in a copy of the reference: the grader must FAIL its exercise, and where a
# hint is given, the FAIL line must name that mistake (the first two are told apart). Instructor-only: the
# reference lines here are the answer key (test_student_copy_holds_no_line_of_the_cut_bodies).
STUDENT_BUGS = [  # (exercise, file, reference line, the same line with a plausible wrong solution[, words of the hint])
    (1, "dsrl.py", "adv = adv / (r.std(1, keepdim=True) + 1e-6)", "adv = adv / (r.std(1, keepdim=True, unbiased=False) + 1e-6)",
     "your std divides by G (biased"),
    (1, "dsrl.py", "adv = adv / (r.std(1, keepdim=True) + 1e-6)", "adv = adv / (r.std() + 1e-6)",  # per-batch std
     "your std is over the whole batch; take it per group"),
    (1, "dsrl.py", ".view(-1, group_size)  # (B, G)", ".view(group_size, -1)  # (B, G)"),  # groups mixed up
    (2, "dsrl.py", '"neg": adv < 0', '"neg": adv <= 0'),  # NSR keeps A = 0 samples
    (2, "dsrl.py", '"pos": adv > 0', '"pos": adv >= 0'),  # PSR keeps A = 0 samples
    (3, "dsrl.py", "return token_logprobs(model, states, y, y_mask, temperature, chunk), y_mask",
     "return token_logprobs(model, states, y, y_mask, 1.0, chunk), y_mask"),  # ignores the temperature
    (3, "dsrl.py", "positions = x_mask.sum(1)[idx, None] + torch.arange(y.shape[1], device=device)",
     "positions = x_mask.shape[1] + torch.arange(y.shape[1], device=device)[None].expand(len(idx), -1)"),  # counts pads
    (3, "dsrl.py", "return token_logprobs(model, states, y, y_mask, temperature, chunk), y_mask",  # full vocabulary
     "return (model.lm_head(states).float() / temperature).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1) * y_mask, y_mask"),
    (4, "dsrl.py", "start = torch.full((y.shape[0], 1), start_id,", "start = torch.full((y.shape[0], 1), pad,"),  # wrong token
    (4, "dsrl.py", "use_cache=False).last_hidden_state\n", "use_cache=False).last_hidden_state.detach()\n"),
    (4, "dsrl.py", "return token_logprobs(model, hidden[:, :-1], y, y_mask, temperature, chunk), y_mask",  # full vocabulary
     "return (model.lm_head(hidden[:, :-1]).float() / temperature).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1) * y_mask, y_mask"),
    (5, "dsrl.py", "dual = torch.minimum(loss, -adv * clip_dual)", "dual = loss"),  # no dual clip
    (5, "dsrl.py", "ratio.clamp(1 - clip_low, 1 + clip_high)", "ratio.clamp(max=1 + clip_high)"),  # lower clamp dropped
    (5, "dsrl.py", "ratio.clamp(1 - clip_low, 1 + clip_high)", "ratio.clamp(1 - clip_high, 1 + clip_low)"),  # swapped
    (6, "dsrl.py", "return (per_token * mask).sum() / max(n_tokens, 1)",  # a mean per sequence
     "return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()"),
    (7, "dsrl.py", 'warm = mode == "dsrl" and step <= warmup_steps', 'warm = mode == "dsrl" and step < warmup_steps'),
    (7, "dsrl.py", 'coef=prerl_coef if space == "y" else 1.0', "coef=1.0"),  # the P(y) coefficient not applied
    (8, "eval.py", "    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))",
     "    return 1.0 - (1.0 - c / n) ** k"),  # biased pass@k
]
# One grading per round; a round holds at most one wrong solution per exercise, so each FAIL is its own bug's.
BUG_ROUNDS = [[bug for n, bug in enumerate(STUDENT_BUGS) if [b[0] for b in STUDENT_BUGS[:n]].count(bug[0]) == r]
              for r in range(max([b[0] for b in STUDENT_BUGS].count(e) for e in range(1, 9)))]


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(len(BUG_ROUNDS)))
def test_course_grader_catches_each_plausible_student_bug(tmp_path, round_):
    bugs = BUG_ROUNDS[round_]
    for name in ("dsrl.py", "eval.py", "grader.py", "scale.py"):
        source = reference(name)
        for _, file, good, bad, *_ in bugs:
            if file == name:
                assert source.count(good) == 1, good
                source = source.replace(good, bad)
        (tmp_path / name).write_text(source)
    res = run_grade(tmp_path / "dsrl.py", "--only", *[b[0] for b in bugs])
    lines = {}  # exercise -> its first FAIL line (exercise 3 has two parts)
    for line in res.stdout.strip().splitlines()[:-1]:
        if " FAIL (" in line:
            lines.setdefault(int(line.split()[1].rstrip("ab")), line)
    assert res.returncode == 1 and set(lines) == {b[0] for b in bugs}, res.stdout + res.stderr
    for exercise, _, _, bad, *hint in bugs:
        line = lines[exercise]
        assert line.startswith(f"exercise {exercise}") and " FAIL (" in line, (bad, line)
        assert "NotImplementedError" not in line and "not run" not in line, (bad, line)
        assert not hint or hint[0] in line, (bad, line)


def test_exercise_1_hints_name_the_mistake():
    """The course grader's hint for exercise 1 names the formula the student used: a per-batch std is told apart
    from a biased per-group one (torch, against the plain-Python variants of the hint)."""
    import torch
    import test_dsrl as spec
    r = torch.tensor(spec.REWARDS, dtype=torch.float32).view(-1, 4)
    centred = r - r.mean(1, keepdim=True)
    per_batch = (centred / (r.std() + 1e-6)).flatten().tolist()
    biased = (centred / (r.std(1, keepdim=True, unbiased=False) + 1e-6)).flatten().tolist()
    batch_mean = (r - r.mean()).flatten().tolist()
    assert spec.advantage_mistake(per_batch, spec.REWARDS, 4, True) == spec.ADVANTAGE_MISTAKES[("group", "batch", True)]
    assert spec.advantage_mistake(biased, spec.REWARDS, 4, True) == spec.ADVANTAGE_MISTAKES[("group", "group", False)]
    assert spec.advantage_mistake(batch_mean, spec.REWARDS, 4, False) == spec.ADVANTAGE_MISTAKES[("batch", None, True)]
    assert "unbiased std of the group" in spec.advantage_mistake([0.0] * 16, spec.REWARDS, 4, True)

# ---- Gradescope: setup.sh and run_autograder in a folder laid out as Gradescope lays it out ---------------------
def autograder(root):
    """root/source: the autograder zip as INSTRUCTOR.md builds it (the student copy, setup.sh, run_autograder)."""
    kit.make_copy(str(root / "source"))
    for name in ("setup.sh", "run_autograder"):
        shutil.copy(os.path.join(HERE, "gradescope", name), root / "source" / name)
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return env


def submit(root, env, dsrl_source, eval_source):
    """One submission: the files in root/submission, run_autograder -> results.json."""
    shutil.rmtree(root / "submission", ignore_errors=True)
    (root / "submission").mkdir()
    (root / "submission" / "dsrl.py").write_text(dsrl_source)
    (root / "submission" / "eval.py").write_text(eval_source)
    res = subprocess.run(["bash", root / "source" / "run_autograder"], capture_output=True, text=True, env=env,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((root / "results" / "results.json").read_text())


@pytest.mark.slow
def test_gradescope_setup_and_run_autograder_grade_the_reference_and_the_empty_copy(tmp_path):
    root = tmp_path / "autograder"
    env = autograder(root)
    # setup.sh installs with pip; here every package is already installed, so pip keeps them (no download)
    res = subprocess.run(["bash", root / "source" / "setup.sh"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "Requirement already satisfied: torch" in res.stdout, res.stdout[-1000:] + res.stderr
    full = submit(root, env, reference("dsrl.py"), reference("eval.py"))
    assert (full["score"], full["max_score"]) == (100, 100), full
    assert [t["name"] for t in full["tests"]] == [grade.title(p, name) for p, _, name in grade.parts()]
    assert all(t["score"] == t["max_score"] == grade.POINTS[p] and t["output"] == "PASS"
               for t, (p, *_) in zip(full["tests"], grade.parts()))
    empty = submit(root, env, (root / "source" / "dsrl.py").read_text(), (root / "source" / "eval.py").read_text())
    assert (empty["score"], empty["max_score"]) == (0, 100), empty
    assert all(t["output"].startswith(f"FAIL (NotImplementedError: Exercise {n}:")
               for t, (_, n, _) in zip(empty["tests"], grade.parts())), empty["tests"]


# ---- Exercise 3: credit for the method by any route, then for the shared prompt forward --------------------------
CONCATENATED = '''

def logprob_y_given_x(model, prompt_ids, response_ids, pad, temperature=1.0, chunk=256, share_prompt=True,
                      checkpointing=False):
    """A correct log P(y|x) by another route: one forward of [prompt] + y per sample, prompt never shared."""
    dev = model.get_input_embeddings().weight.device
    prompts, prompt_mask = left_pad(prompt_ids, pad, dev)
    answers, answer_mask = right_pad(response_ids, pad, dev)
    full_mask = torch.cat([prompt_mask, answer_mask.to(prompt_mask.dtype)], dim=1)
    out = model.base_model(input_ids=torch.cat([prompts, answers], dim=1), attention_mask=full_mask,
                           position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    before_each_answer_token = out.last_hidden_state[:, prompts.shape[1] - 1:-1]
    return token_logprobs(model, before_each_answer_token, answers, answer_mask, temperature, chunk), answer_mask
'''


@pytest.mark.slow
def test_grader_gives_3a_to_a_concatenated_forward_and_3b_only_to_a_shared_one(tmp_path):
    """An independent, correct log P(y|x) by one concatenated forward earns 3a (the method) and not 3b (the shared
    prompt forward), with a FAIL line that says what 3b asks for."""
    res = run_grade(student(tmp_path / "s", reference("dsrl.py") + CONCATENATED), "--only", 3)
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "exercise 3a logprob_y_given_x (log-probs and gradients): PASS", res.stdout + res.stderr
    assert lines[1].startswith("exercise 3b logprob_y_given_x (the prompt's forward shared): FAIL (") and (
        "share one forward" in lines[1]) and lines[2] == "score=1/2", res.stdout
    out = grade.gradescope([(p, name, None if p == "3a" else "x") for p, _, name in grade.parts([3])])
    assert (out["score"], out["max_score"]) == (grade.POINTS["3a"], 20)


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
