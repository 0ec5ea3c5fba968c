"""Tests of the answer checker: grader.py, and dsrl.py's reward built on it (official string scorer first,
then grader.grade's equivalence). Offline, CPU, no model.  Run:  python -m pytest -q test_grader.py

The labelled cases in testdata/ are the reference: answer_cases_*.jsonl hold responses, golds and a human
verdict; answer_outcomes_dev.jsonl freezes the (reward, outcome) of every dev case.
"""
import ast
import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# course/grade.py grades a student's copy: DSRL_UNDER_TEST names its dsrl.py (its grader.py sits beside it)
CODE = os.path.dirname(os.path.abspath(os.environ.get("DSRL_UNDER_TEST") or os.path.join(HERE, "dsrl.py")))
sys.path.insert(0, CODE)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before dsrl imports torch: on a busy 2-core machine two threads crawl
import dsrl  # noqa: E402
import grader  # noqa: E402
from dsrl import last_boxed, official_reward, strip_string  # noqa: E402

GRADER_PY = os.path.join(CODE, "grader.py")
SLOW_S = 3.0  # a bound on one grading call, well above grader.TIME_BUDGET_S (0.5 s): a busy machine must not fail it


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def reward_outcome(response, gold):
    return dsrl.reward(response, gold, "math")


def math_reward(response, gold):
    """The trainer's default reward r (--reward math), without its outcome label."""
    return reward_outcome(response, gold)[0]


def box(s):
    return 'Some reasoning.\n\nThe final answer is $\\boxed{%s}$.' % s


DEV_CASES = read_jsonl(os.path.join(HERE, "testdata", "answer_cases_dev.jsonl"))  # copy of ../shared/data's file
NEW_CASES = read_jsonl(os.path.join(HERE, "testdata", "answer_cases_new.jsonl"))
# (reward, outcome) of every dev case, frozen from dsrl.reward before the checker moved to grader.py
DEV_OUTCOMES = {r["id"]: (r["reward"], r["outcome"])
                for r in read_jsonl(os.path.join(HERE, "testdata", "answer_outcomes_dev.jsonl"))}


# ----------------------------------------------------------------------------------------------------
# 8. The reward: dev-file agreement, official superset, categories, adversarial inputs, time bound
# ----------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------- dev-file agreement
def test_dev_agreement():
    agree = 0
    for c in DEV_CASES:
        r = math_reward(c['response'], c['gold'])
        assert isinstance(r, float) and r in (0.0, 1.0)
        agree += (r == 1.0) == c['equal']
    assert agree / len(DEV_CASES) >= 0.95


def test_official_accept_implies_ours():
    for c in DEV_CASES:
        if official_reward(c['response'], c['gold']) == 1.0:
            assert math_reward(c['response'], c['gold']) == 1.0, c['id']
    for c in DEV_CASES:  # and the gold itself, boxed, is always right
        if c['gold'] and official_reward(box(c['gold']), c['gold']) == 1.0:
            assert math_reward(box(c['gold']), c['gold']) == 1.0


# ---------------------------------------------------------------- per-category units
CATEGORY_CASES = {
    'integer': [('42', '42', 1), ('42.0', '42', 1), ('-7', '7', 0), ('1,386', '1386', 1),
                ('1\\,386', '1386', 1), ('1{,}000{,}000', '1000000', 1), ('10^{6}', '1000000', 1),
                ('900,000', '9,000,000', 0), ('\\frac{1}{29,322,216}', '\\frac{1}{29322216}', 1)],
    'fraction': [('\\dfrac{3}{4}', '\\frac34', 1), ('3/4', '\\frac{3}{4}', 1), ('0.75', '\\frac34', 1),
                 ('\\frac{6}{8}', '\\frac34', 1), ('\\frac{3}{5}', '\\frac34', 0),
                 ('-\\frac{1}{2}', '\\frac{-1}{2}', 1), ('0.33', '\\frac13', 0),
                 ('\\frac94', '2\\frac{1}{4}', 1), ('3\\over 4', '\\frac34', 1)],
    'decimal': [('3.50', '3.5', 1), ('.5', '0.5', 1), ('3.49', '3.5', 0), ('1000.0', '1000', 1),
                ('3 \\times 10^{5}', '300000', 1), ('9.92\\times10^{-3}', '0.000992', 0)],
    'units/text': [('5\\text{ cm}^2', '5', 1), ('5 \\text{meters}', '5', 1), ('\\text{5 apples}', '5', 1),
                   ('\\$5.00', '5', 1), ('6\\text{ cm}', '5', 0), ('\\text{Sunday}', 'Sunday', 1),
                   ('\\text{Sunday}', '{Monday}', 0), ('125 miles', '125normal{miles}', 1),
                   ('LQXS', 'LQSX', 0), ('\\emptyset', '{empty}', 1)],
    'degrees': [('30^\\circ', '30', 1), ('30^{\\circ}', '30', 1), ('30\\text{ degrees}', '30', 1),
                ('60^\\circ', '30', 0)],
    'sqrt': [('2\\sqrt{2}', '\\sqrt8', 1), ('\\sqrt{8}', '2\\sqrt2', 1), ('1.414', '\\sqrt2', 0),
             ('\\frac{\\sqrt{2}}{2}', '\\frac{1}{\\sqrt2}', 1), ('\\sqrt[3]{8}', '2', 1),
             ('2^{1/2}', '\\sqrt2', 1), ('1.4142135623730951', '\\sqrt2', 0), ('\\sqrt3', '\\sqrt{3}', 1)],
    'pi': [('\\pi \\cdot 2', '2\\pi', 1), ('6.28', '2\\pi', 0), ('\\frac{\\pi}{3}', '\\frac13\\pi', 1),
           ('90^\\circ', '\\frac{\\pi}{2}', 0)],
    'expression': [('x^2+2x+1', '(x+1)^2', 1), ('2x+1', '1+2x', 1), ('x^2-1', '(x-1)(x+1)', 1),
                   ('x^2+1', '(x+1)^2', 0), ('\\frac{1}{x}', 'x^{-1}', 1),
                   ('\\sin^2 x + \\cos^2 x', '1', 1), ('\\frac{2}{\\cos x}', '2\\secx', 1),
                   ('2\\alpha', '\\alpha \\cdot 2', 1), ('2b', '2B', 0), ('3+4i', '4i+3', 1),
                   ('3-4i', '3+4i', 0), ('2^{99}', '2^{100}-2', 0)],
    'interval': [('[1, 2)', '[1,2)', 1), ('(1,2)', '[1,2]', 0), ('(-\\infty, 3]', '(-\\infty,3]', 1),
                 ('(-\\infty,3)', '(-\\infty,3]', 0), ('[2,3]\\cup[0,1]', '[0,1]\\cup[2,3]', 1),
                 ('\\left[0, \\frac12\\right)', '[0,0.5)', 1)],
    'tuple': [('(1, 2)', '(1,2)', 1), ('(2,1)', '(1,2)', 0), ('(\\frac12, 3)', '(0.5,3)', 1),
              ('(1,2);(3,4)', '(1,2);(3,4)', 1), ('{1,3}', '(3,1)', 0)],
    'set': [('\\{1,2\\}', '\\{2,1\\}', 1), ('1,2', '2,1', 1), ('1, 2, 3', '1,2', 0),
            ('\\{1,2\\}', '\\{1,3\\}', 0), ('\\pm 3', '3,-3', 1), ('3', '\\pm3', 0),
            ('A, B, E', '{A,B,E}', 1)],
    'matrix': [('\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{pmatrix}1&2\\3&4\\end{pmatrix}', 1),
               ('\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', 1),
               ('\\begin{pmatrix}1\\\\2\\end{pmatrix}', '\\begin{pmatrix}2\\\\1\\end{pmatrix}', 0),
               ('(1,2,3)', '\\begin{pmatrix}1\\\\2\\\\3\\end{pmatrix}', 1)],
    'equation': [('x=5', '5', 1), ('y = 2x+3', '2x+3', 1), ('x+y=1', 'y+x=1', 1),
                 ('2x+2y=2', 'x+y=1', 1), ('x+y=2', 'x+y=1', 0), ('x = 5', 'x=6', 0),
                 ('x \\geq 2', 'x\\ge2', 1), ('2 \\le x', 'x \\ge 2', 1), ('x>2', 'x\\ge2', 0)],
    'percent': [('50\\%', '50', 1), ('50%', '50', 1), ('50\\%', '0.5', 1), ('0.5', '50\\%', 1),
                ('5\\%', '50', 0), ('1.25\\%', '12.5', 0)],
    'mc': [('C', '(C)', 1), ('\\text{(C)}', 'C', 1), ('(C)', 'C', 1), ('\\textbf{(C)}', 'C', 1),
           ('D', 'C', 0), ('\\text{(D)}', '{(E)},', 0), ('(C) 12', 'C', 1)],
    'empty': [('', '42', 0), ('5', '', 0)],
    'approx': [('\\approx 3.14', '3.14', 1), ('\\frac23', '\\frac{2}{3}\\approx0.67', 1),
               ('0.56', '0.56=56', 1)],
    'base': [('1011_2', '1011_2', 1), ('11', '1011_2', 0)],
}


@pytest.mark.parametrize('cat', sorted(CATEGORY_CASES))
def test_category(cat):
    for ans, gold, want in CATEGORY_CASES[cat]:
        got = math_reward(box(ans), gold)
        assert got == float(want), (cat, ans, gold, want)


def test_no_box_outcome():
    assert reward_outcome('I think it is 5.', '5') == (0.0, 'no_box')
    assert reward_outcome('The answer is \\boxed{\\frac{3}{4}', '\\frac34') == (0.0, 'no_box')


def test_nested_and_last_box():
    assert last_boxed('a \\boxed{3} b \\boxed{\\frac{1}{2}} c') == '\\frac{1}{2}'
    assert math_reward('\\boxed{\\boxed{5}}', '5') == 1.0
    assert math_reward('First \\boxed{3}, wait, actually \\boxed{5}.', '5') == 1.0
    assert math_reward('First \\boxed{5}, wait, actually \\boxed{3}.', '5') == 0.0
    assert last_boxed('\\boxed 7$') == '7' and last_boxed('nothing') is None


def test_fbox():
    assert last_boxed('so \\fbox{12}') == '12'
    assert math_reward('so \\fbox{12}.', '12') == 1.0


def test_strip_string_official_rules():
    assert strip_string('\\dfrac12') == '\\frac{1}{2}'
    assert strip_string('3/4') == '\\frac{3}{4}'
    assert strip_string('\\left( 3 \\right)') == '(3)'
    assert strip_string('90^\\circ') == '90'
    assert strip_string('\\$5') == '5' and strip_string('50\\%') == '50'
    assert strip_string('5\\text{ cm}') == '5'
    assert strip_string('.5') == '\\frac{1}{2}' and strip_string('0.5') == '\\frac{1}{2}'
    assert strip_string('x = 3') == '3' and strip_string('\\sqrt2') == '\\sqrt{2}'
    assert official_reward(box('\\tfrac{1}{2}'), '0.5') == 1.0
    assert official_reward(box('2x'), 'x2') == 0.0


# ---------------------------------------------------------------- adversarial and time bound
ADVERSARIAL = [
    (box('9^9^9^9'), '1'), (box('9^{9^{9^{9}}}'), '1'), (box('10^{10^{10^{10}}}-1'), '0'),
    (box('9' * 50000), '9'), (box('x' * 100000), 'x'), ('a' * 100000, '1'),
    ('\\boxed{' + '{' * 200 + '1' + '}' * 200 + '}', '2'), (box('(' * 200 + '1' + ')' * 200), '2'),
    ('\\boxed{' * 300 + '7' + '}' * 300, '8'), ('\\boxed{' * 300 + '7', '7'),
    ('}}}}{{{ \\boxed{{{{3}} and \\left( \\right', '3'), (box('\x00' * 500), '0'),
    (box("__import__('os').system('ls')"), '0'), (box("__import__('time').sleep(30)"), '0'),
    (box('\\frac{1}{0}'), '\\infty'),
    (box('(10^{100})!'), '1'), (box('\\sin(10^{1000})'), '0'), (box('x^{x^{x^{x^{x}}}}'), 'x'),
    (box('+'.join(['x'] * 3000)), '1'), (box('2^{-99999999}'), '0'),
    (box('\\begin{pmatrix}' + '\\\\'.join(['&'.join(['1'] * 60)] * 60) + '\\end{pmatrix}'), '1'),
    (box('\\sqrt{' * 100 + '2' + '}' * 100), '2'), (None, '1'), (box('1'), None),
]


@pytest.mark.parametrize('i', range(len(ADVERSARIAL)))
def test_adversarial_zero_and_fast(i):
    resp, gold = ADVERSARIAL[i]
    t = time.perf_counter()
    r = math_reward(resp, gold)
    assert time.perf_counter() - t < SLOW_S
    assert r == 0.0 and isinstance(r, float)


def test_time_bound_from_worker_thread():
    """The deadline is cooperative (no signals), so it also works off the main thread."""
    results = []

    def work():
        old = grader.TIME_BUDGET_S
        grader.TIME_BUDGET_S = 0.0  # force the deadline to expire on the first check
        try:
            results.append(reward_outcome(box('(x+1)^2'), 'x^2+2x+1'))
        finally:
            grader.TIME_BUDGET_S = old
        t = time.perf_counter()
        for resp, gold in ADVERSARIAL:
            results.append(reward_outcome(resp, gold))
        results.append(time.perf_counter() - t)

    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert not th.is_alive()
    assert results[0] == (0.0, 'timeout')
    assert all(r[0] == 0.0 for r in results[1:-1])
    assert results[-1] < len(ADVERSARIAL) * SLOW_S
    assert reward_outcome(box('(x+1)^2'), 'x^2+2x+1') == (1.0, 'right')


def test_never_raises_on_junk():
    for resp in ['\\boxed{\\frac}', '\\boxed{\\sqrt}', '\\boxed{^}', '\\boxed{\\begin{pmatrix}}',
                 '\\boxed{\\left(}', '\\boxed{1/}', '\\boxed{\\text{}}', '\\boxed{x/y}', 12, b'x']:
        r = reward_outcome(resp, '1')
        assert isinstance(r[0], float) and r[1] in ('right', 'wrong', 'no_box', 'unparseable', 'timeout')


def test_a_decimal_point_as_an_ungrouped_argument():
    """LaTeX takes ".9" whole after \\sqrt: no stray '.' literal (it once escaped as a ValueError)."""
    assert grader.grade('\\sqrt.9', '\\sqrt{0.9}') == (1.0, 'right')
    assert grader.grade('\\frac.5 2', '0.25') == (1.0, 'right')
    assert grader.grade('\\frac1.', '1') == (0.0, 'wrong')


def test_thread_safety_matches_serial():
    serial = [math_reward(c['response'], c['gold']) for c in DEV_CASES]
    out = {}

    def work(k):
        out[k] = [math_reward(c['response'], c['gold']) for c in DEV_CASES]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(out[k] == serial for k in range(6))


HEDGES = ['42 \\text{or} 43', '42 \\; \\text{or} \\; 43', '42, 43', '42 or 43', '42 \\text{ or } 43', '\\text{maybe } 42',
          'maybe 42']


def test_hedges_are_wrong_even_where_the_official_scorer_accepts_them():
    """The one place hedges are tested: two answers for one gold are wrong, whatever the official scorer says."""
    for answer in HEDGES:
        assert reward_outcome(box(answer), "42") == (0.0, "wrong"), answer
    hedge = "So it is $\\boxed{42 \\text{ or } 43}$."
    assert official_reward(hedge, "42") == 1.0  # the official rule cuts "\text{ or } 43" away as units
    assert grader.grade('42 \\text{ or } 43', '42', official_equal=True) == (0.0, 'wrong')  # the veto on top of it
    assert math_reward("$\\boxed{\\text{A or B}}$", "\\text{A or B}") == 1.0  # unless the gold says so itself
    assert math_reward("$\\boxed{x=2 \\text{ or } x=3}$", "2,3") == 1.0  # "or" joining ALL the roots is a list


def test_multiple_choice_letters():
    assert math_reward("$\\boxed{\\textbf{(E)}\\ 7}$", "\\textbf{(E)}") == 1.0  # letter then value, spaces gone
    assert math_reward("\\boxed{C}", "(C)") == 1.0 and math_reward("\\boxed{(B)}", "B") == 1.0
    assert math_reward("\\boxed{D}", "C") == 0.0
    assert math_reward("\\boxed{(A)+(B)}", "(A)") == 0.0 and math_reward("\\boxed{(A), (B)}", "A") == 0.0


# ---------------------------------------------------------------- grader.py: the checker on its own
def run_grader(*args):
    return subprocess.run([sys.executable, GRADER_PY, *args], capture_output=True, text=True, timeout=600)


def test_last_box_reads_the_last_top_level_box():
    """The answer training reads (dsrl.last_boxed is grader.last_box): the last top-level box, None when cut off."""
    cases = [('a \\boxed{3} b \\boxed{\\frac{1}{2}} c', '\\frac{1}{2}'), ('\\boxed{\\boxed{5}}', '\\boxed{5}'),
             ('\\boxed 7$', '7'), ('so \\fbox{12}.', '12'), ('The answer is \\boxed{\\frac{3}{4}', None),
             ('\\boxed{1} and \\boxed{', None), ('\\boxed {2}', '2'), ('\\boxedx{2}', None), ('nothing', None),
             ('\\boxed', None), ('\\boxed 3 \\boxed{2}', '3 \\boxed{2}'), (None, None), (12, None),
             ('\\boxed{' * 300 + '7' + '}' * 300, '\\boxed{' * 299 + '7' + '}' * 299)]
    for text, want in cases:
        assert grader.last_box(text) == want == last_boxed(text), text


def test_grade_outcomes_and_never_raises():
    assert grader.OUTCOMES == ('right', 'wrong', 'no_box', 'unparseable', 'timeout')
    assert grader.grade('\\frac{2}{4}', '0.5') == (1.0, 'right')
    assert grader.grade('3', '4') == (0.0, 'wrong')
    assert grader.grade(None, '4') == (0.0, 'no_box')
    assert grader.grade(None, '4', official_equal=True) == (1.0, 'right')  # the official verdict comes first
    assert grader.grade('1' * 2000, '1') == (0.0, 'unparseable')
    for answer, gold in [('\\frac', '1'), ('1', None), (5, '5'), ('\\frac{1}{0}', '1'), ('9^{9^{9^9}}', '1')]:
        r, outcome = grader.grade(answer, gold)
        assert r == 0.0 and outcome in grader.OUTCOMES


def test_deadline_gives_timeout_in_a_worker_thread(monkeypatch):
    monkeypatch.setattr(grader, 'TIME_BUDGET_S', 0.0)  # the deadline expires at the first check
    results = []
    worker = threading.Thread(target=lambda: results.append(grader.grade('(x+1)^2', 'x^2+2x+1')))
    worker.start()
    worker.join(30)
    assert results == [(0.0, 'timeout')]
    monkeypatch.setattr(grader, 'TIME_BUDGET_S', 0.5)
    assert grader.grade('(x+1)^2', 'x^2+2x+1') == (1.0, 'right')


def test_cli_right_wrong_and_no_box():
    right = run_grader('so $\\boxed{\\frac{2}{4}}$.', '0.5')
    assert right.returncode == 0 and right.stderr == ''
    lines = right.stdout.splitlines()
    assert lines[0] == 'answer: \\frac{2}{4}' and lines[1] == 'gold: 0.5'
    assert lines[2] == 'cleaned answer: \\frac{2}{4}' and lines[3] == 'cleaned gold: 0.5'
    assert lines[4:] == ['verdict: equal', 'outcome: right']
    wrong = run_grader('so \\boxed{3}', '4')
    assert wrong.returncode == 0
    assert 'answer: 3' in wrong.stdout and wrong.stdout.endswith('verdict: not equal\noutcome: wrong\n')
    for bare in ('7', 'x = 7'):  # no box: training scores it 0 (no_box) even when the text equals the gold
        assert dsrl.reward(bare, '7') == (0.0, 'no_box')
        res = run_grader(bare, '7')
        assert res.returncode == 0 and res.stdout.endswith('verdict: not equal\noutcome: no_box\n'), res.stdout
        assert res.stdout.startswith('answer: (none: no \\boxed{} in the response, so training scores it 0'), res.stdout
    cut = run_grader('The answer is \\boxed{\\frac{3}{4}', '\\frac34')
    assert cut.returncode == 0 and cut.stdout.endswith('verdict: not equal\noutcome: no_box\n')


def test_cli_bad_usage_exits_2_without_traceback():
    for args in [(), ('only one',), ('a', 'b', 'c')]:
        res = run_grader(*args)
        assert res.returncode == 2 and res.stdout == ''
        assert len(res.stderr.strip().splitlines()) == 1 and 'usage' in res.stderr
        assert 'Traceback' not in res.stderr
    helped = run_grader('--help')
    assert helped.returncode == 0 and 'dsrl.official_reward' in helped.stdout


def test_grader_does_not_import_dsrl():
    tree = ast.parse(open(GRADER_PY).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name.split('.')[0] != 'dsrl' for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or '').split('.')[0] != 'dsrl'


def test_grader_functions_are_short():
    tree = ast.parse(open(GRADER_PY).read())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 40]
    assert long == []


def test_two_public_functions_besides_main():
    """grade (the verdict) and last_box (the answer a response gives: dsrl.py's last_boxed is it)."""
    public = {name for name, value in vars(grader).items()
              if callable(value) and not name.startswith('_') and getattr(value, '__module__', None) == 'grader'}
    assert public == {'grade', 'last_box', 'main'}




# ---------------------------------------------------------------- new labelled cases: the reward's former misses
def test_new_cases_file_covers_each_kind_with_right_and_wrong_cases():
    assert [c['id'] for c in NEW_CASES] == ['n%04d' % (k + 1) for k in range(len(NEW_CASES))]
    for kind in ('empty_gold', 'left_right_dot', 'array_matrix', 'digit_groups', 'inequality_union', 'all_reals'):
        cases = [c for c in NEW_CASES if c['category'] == kind]
        assert len(cases) >= 8 and {c['equal'] for c in cases} == {True, False}, kind
        assert all(set(c) == {'id', 'response', 'gold', 'equal', 'category'} for c in cases)


def test_new_cases_agreement_no_timeouts_no_crashes():
    agree, slowest = 0, 0.0
    for c in NEW_CASES:
        t = time.perf_counter()
        r, outcome = dsrl.reward(c['response'], c['gold'])
        slowest = max(slowest, time.perf_counter() - t)
        assert outcome in grader.OUTCOMES and outcome not in ('timeout', 'unparseable'), c['id']
        agree += (r == 1.0) == c['equal']
    assert agree / len(NEW_CASES) >= 0.95
    assert slowest < SLOW_S


def test_dev_outcomes_still_frozen():
    assert set(DEV_OUTCOMES) == {c['id'] for c in DEV_CASES}
    for c in DEV_CASES:
        assert dsrl.reward(c['response'], c['gold']) == DEV_OUTCOMES[c['id']], c['id']


# ---------------------------------------------------------------- rule 1: an empty gold is never matched
def test_empty_gold_is_never_matched():
    for answer in (None, '', '  ', '5', '\\emptyset'):
        for official in (False, True):
            assert grader.grade(answer, '', official_equal=official)[0] == 0.0, (answer, official)
    assert grader.grade(None, '') == (0.0, 'no_box')
    assert grader.grade('', '') == (0.0, 'wrong') and grader.grade('  ', '') == (0.0, 'wrong')
    assert grader.grade('', ' $ $ \\, ', official_equal=True) == (0.0, 'wrong')  # blank in any spelling
    assert dsrl.official_reward(box(''), '') == 1.0  # the official string scorer matches '' with ''
    assert dsrl.reward(box(''), '') == (0.0, 'wrong')  # ... but the reward does not
    assert dsrl.reward(box('5'), '') == (0.0, 'wrong')
    assert dsrl.reward(box('\\emptyset'), '\\emptyset') == (1.0, 'right')  # the empty SET is an answer


# ---------------------------------------------------------------- rule 2: \left. ... \right. (invisible delimiters)
def test_invisible_left_right_delimiters_are_dropped():
    assert dsrl.reward(box('\\left. \\frac{3}{4} \\right.'), '\\frac34') == (1.0, 'right')
    assert math_reward(box('\\left. 2\\sqrt{3} \\right.'), '\\sqrt{12}') == 1.0
    assert math_reward(box('\\left. \\frac{1}{2} \\right|'), '0.5') == 1.0  # evaluation bar
    assert math_reward(box('\\left| \\frac{1}{2} \\right.'), '0.5') == 1.0
    assert grader.grade('\\left\\{ 1, 2 \\right.', '\\{1,2\\}') == (1.0, 'right')  # (boxed, dsrl.last_boxed
    # counts "\\{" as a brace, finds the box unbalanced and gives no_box: so this form is checked on the grader alone)
    assert math_reward(box('\\left. (1,2] \\right.'), '[1,2]') == 0.0
    assert math_reward(box('\\left. 7 \\right.'), '8') == 0.0
    assert math_reward(box('\\left| -3 \\right|'), '3') == 1.0  # a visible pair is kept: |-3|
    assert math_reward(box('\\left| -3 \\right|'), '-3') == 0.0


# ---------------------------------------------------------------- rule 3: array matrices in brackets
def test_array_matrix_in_brackets_equals_pmatrix():
    pmatrix = '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}'
    for answer in ('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]',
                   '\\left(\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right)',
                   '\\left[\\begin{array} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]',  # no column spec
                   '\\left[\\begin{array}{c|c} 1 & 2 \\\\ \\hline 3 & 4 \\end{array}\\right]',
                   '\\left[ \\begin{matrix} 1 & 2 \\\\ 3 & 4 \\end{matrix} \\right]',
                   '\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}'):
        assert dsrl.reward(box(answer), pmatrix) == (1.0, 'right'), answer
    assert math_reward(box('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]'),
                            '\\begin{pmatrix}1&2\\3&4\\end{pmatrix}') == 1.0  # a normalised MATH gold
    assert math_reward(box('\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 5 \\end{array}\\right]'), pmatrix) == 0.0
    assert math_reward(box('\\left|\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right|'), pmatrix) == 0.0
    # shapes must agree: the same four entries as 1x4 or 2x2 are different matrices
    assert math_reward(box('\\begin{pmatrix} 1 & 2 & 3 & 4 \\end{pmatrix}'), pmatrix) == 0.0
    assert math_reward(box('\\begin{pmatrix} 1 & 2 \\end{pmatrix}'),
                            '\\begin{pmatrix}1\\\\2\\end{pmatrix}') == 1.0  # vectors: row = column


# ---------------------------------------------------------------- rule 4: digit groups
def test_digit_groups_are_one_number():
    for answer in ('1,\\!234,\\!567', '1\\,234\\,567', '1{,}234{,}567', '1,\\! 234,\\! 567', '1 234 567',
                   '1\\ 234\\ 567', '1,234,567'):
        assert dsrl.reward(box(answer), '1234567') == (1.0, 'right'), answer
    assert math_reward(box('1{,}234'), '1234') == 1.0
    assert math_reward(box('(1,\\!234, 5)'), '(1234, 5)') == 1.0  # also inside a tuple
    assert math_reward(box('1 234'), '234') == 0.0  # a space between groups is no product
    assert math_reward(box('1,\\!234,\\!576'), '1234567') == 0.0
    assert math_reward(box('1,\\! 23'), '123') == 0.0  # not a group of three
    assert math_reward(box('1,\\!000'), '1') == 0.0


# ---------------------------------------------------------------- rule 5: "or" between inequalities is a union
def test_inequalities_joined_by_or_are_a_union():
    union = '(-\\infty,2]\\cup(5,\\infty)'
    for answer in ('x \\le 2 \\text{ or } x > 5', 'x \\leq 2 or x > 5', 'x > 5 \\text{ or } x \\le 2',
                   'x \\le 2 \\quad\\text{or}\\quad x > 5', 'x \\le 2 \\cup x > 5', '2 \\ge x \\text{ or } 5 < x'):
        assert dsrl.reward(box(answer), union) == (1.0, 'right'), answer
    assert math_reward(box(union), 'x \\le 2 \\text{ or } x > 5') == 1.0  # the gold may be the inequalities
    assert math_reward(box('x \\le 2 \\text{ or } x \\ge 5'), union) == 0.0  # endpoint
    assert math_reward(box('x \\le 2 \\text{ or } y > 5'), union) == 0.0  # two variables
    assert math_reward(box('x < 1 \\text{ or } x = 3'), '(-\\infty,1)\\cup\\{3\\}') == 1.0
    assert math_reward(box('x \\le 2,\\ \\text{or}\\ x > 5'), union) == 1.0  # comma before "or"
    assert math_reward(box('x \\le 2 \\textrm{or} x > 5'), union) == 1.0
    assert math_reward(box('1, 2, \\text{or } 3'), '1, 2, 3') == 1.0  # Oxford comma in a list of roots
    # "or" between numbers (or equations alone) stays a hedge: wrong against one value and against the union
    assert dsrl.reward(box('2 \\text{ or } 5'), '2') == (0.0, 'wrong')
    assert math_reward(box('2 \\text{ or } 5'), union) == 0.0
    assert math_reward(box('x = 2 \\text{ or } x = 5'), '2') == 0.0
    assert math_reward(box('x = 2 \\text{ or } x = 5'), '2, 5') == 1.0


# ---------------------------------------------------------------- rule 6: all real numbers
def test_all_reals():
    everything = '(-\\infty,\\infty)'
    for answer in ('\\mathbb{R}', '\\mathbb R', '\\R', '\\text{all real numbers}', '\\text{All real numbers}',
                   'x \\in \\mathbb{R}', '\\text{all real } x', '(-\\infty, +\\infty)', '-\\infty < x < \\infty'):
        assert dsrl.reward(box(answer), everything) == (1.0, 'right'), answer
    assert math_reward(box(everything), '\\mathbb{R}') == 1.0
    for answer in ('\\mathbb{R}^+', '\\mathbb{R}^2', '\\mathbb{Z}', '[0,\\infty)', '\\mathbb{R} \\setminus \\{0\\}',
                   '\\text{all real numbers except } 2'):
        assert math_reward(box(answer), everything) == 0.0, answer


# ---------------------------------------------------------------- the new rules stay fast on hostile input
HOSTILE = [
    '1' + ' ' * 990 + '234', '1 ' * 495, '1,\\!' * 240, '123 ' * 249, '\\left.' * 160,
    '\\left(' * 160 + '\\right.' * 100, '\\right|' * 140, 'x<1 \\text{ or } ' * 60 + 'x>2', 'x<1 or ' * 140,
    '\\mathbb' + ' ' * 900 + 'R', 'all' + ' ' * 900 + 'real', '[' * 400 + '\\begin{array}' + ']' * 400,
    '(\\begin{array}' * 70 + ')' * 70, '1{,} ' * 190 + '123', '\\left[\\begin{array}{' + 'c' * 900 + '}',
    '1,' + ','.join(['234'] * 240), '-3\\frac{1}{8}' * 70, '\\frac12' * 140 + '\\begin{pmatrix}' + '1&' * 200 + '\\end{pmatrix}',
    '\\text{at least }' * 58, 'at ' * 330, '(b)' * 330, '(C) ' + '(' * 400, '1' * 900 + '_2', '\\overline{' + 'AB' * 400 + '}',
    '-' * 900 + '\\begin{pmatrix}1\\end{pmatrix}', '2\\begin{pmatrix}' * 60,
]


@pytest.mark.parametrize('i', range(len(HOSTILE)))
def test_hostile_inputs_for_the_new_rules_are_fast(i):
    for gold in ('7', '(-\\infty,\\infty)', '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}'):
        t = time.perf_counter()
        r, outcome = dsrl.reward(box(HOSTILE[i]), gold)
        assert time.perf_counter() - t < SLOW_S
        assert outcome in grader.OUTCOMES and (r == 0.0 or gold != '7')  # "\\mathbb   R" is all reals



def test_approximations_and_repeating_decimals():
    assert math_reward("\\boxed{x \\approx 2.45}", "2.45") == 1.0
    assert math_reward("\\boxed{\\sqrt{6} \\approx 2.45}", "\\sqrt{6}") == 1.0
    assert math_reward("\\boxed{x \\approx 2.45}", "\\sqrt{6}") == 0.0  # a rounded value is not the exact one
    assert math_reward("\\boxed{0.1\\overline{6}}", "\\frac16") == 1.0
    assert math_reward("\\boxed{1.\\overline{6}}", "\\frac{5}{3}") == 1.0
    assert math_reward("\\boxed{0.\\overline{3}}", "0.33") == 0.0
    assert reward_outcome("\\boxed{" + "9" * 6000 + ".\\overline{3}}", "1")[0] == 0.0  # huge: no crash


def test_vectors_and_explicit_base_ten():
    assert math_reward("\\boxed{\\langle 1,2\\rangle}", "(1,2)") == 1.0
    assert math_reward("\\boxed{\\langle 1,2\\rangle}", "(2,1)") == 0.0
    assert math_reward("\\boxed{5_{10}}", "5") == 1.0


# ---------------------------------------------------------------- eight classes of answers the checker had never seen
PMATRIX = '\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}'
UNSEEN_CLASSES = {  # (answer, gold, right?): right answers accepted AND near misses refused, per class
    'negative_mixed_number': [  # -3 1/8 is -(3 + 1/8), never -3 x 1/8
        ('-\\frac{25}{8}', '-3\\frac{1}{8}', 1), ('-3.125', '-3\\frac{1}{8}', 1), ('-3\\frac18', '-\\frac{25}{8}', 1),
        ('-15.6', '-15\\frac{3}{5}', 1), ('-2\\tfrac{1}{4}', '-\\frac94', 1), ('- 1 \\frac{1}{2}', '-1.5', 1),
        ('(-3\\frac{1}{8}, 2)', '(-\\frac{25}{8}, 2)', 1), ('5-3\\frac{1}{8}', '\\frac{15}{8}', 1),
        ('-\\frac{3}{8}', '-3\\frac{1}{8}', 0), ('-\\frac{23}{8}', '-3\\frac{1}{8}', 0), ('\\frac{25}{8}', '-3\\frac18', 0),
        ('-0.375', '-3\\frac{1}{8}', 0), ('-\\frac{3x}{8}', '-3\\frac{x}{8}', 1)],  # with a variable: a product
    'comma_list_or_thousands': [  # a plain "30,150" gold is read both ways: a list of answers or one number
        ('150^\\circ, 30^\\circ', '30,150', 1), ('150,30', '30,150', 1), ('30, 150', '30,150', 1),
        ('\\{315, 45, 225, 135\\}', '45,135,225,315', 1), ('256, 81', '81,256', 1), ('1657', '1,657', 1),
        ('12650', '12,650', 1), ('1{,}000{,}000', '1,000,000', 1), ('1,386', '1386', 1), ('120^\\circ, 60^\\circ', '60,120', 1),
        ('30', '30,150', 0), ('150, 30, 0', '30,150', 0), ('30, 151', '30,150', 0), ('3015', '30,150', 0),
        ('1, 0', '1,000', 0), ('1,000', '1, 0', 0), ('60, 120', '60,121', 0)],
    'qualifier_words': [  # a bound or an estimate is not the value; a unit or "exactly" still goes
        ('\\text{at least } 12', '12', 0), ('\\text{at most } 12', '12', 0), ('\\text{about } 12', '12', 0),
        ('\\text{approximately } 3.5', '3.5', 0), ('\\text{more than } 100', '100', 0), ('\\text{fewer than }5', '5', 0),
        ('\\text{At least } 12', '12', 0), ('12', '\\text{at least } 12', 0), ('\\text{at least } 12', '\\text{at most } 12', 0),
        ('\\text{roughly } 7 \\text{ cm}', '7', 0), ('12 \\text{ at most}', '12', 0),
        ('\\text{at least } 12', '\\text{at least } 12', 1), ('\\text{at least }12', 'at least 12', 1),
        ('12 \\text{ apples}', '12', 1), ('\\approx 3.14', '3.14', 1), ('\\text{exactly } 12', '12', 1),
        ('12\\text{ cm}', '12', 1)],
    'choice_letter_with_value': [  # "(C) 17" is the choice C and the value 17
        ('\\textbf{(C)}\\ 17', '17', 1), ('(C) 17', '17', 1), ('(B)\\ \\frac{1}{2}', '0.5', 1),
        ('\\text{(E) } 2\\sqrt{3}', '\\sqrt{12}', 1), ('17', '\\textbf{(C)}\\ 17', 1), ('\\textbf{(C)}\\ 17', 'C', 1),
        ('\\textbf{(C)}\\ 18', '17', 0), ('\\textbf{(C)}', '17', 0), ('C', '17', 0), ('(C) 17', 'D', 0),
        ('(C) 17', '(D) 17', 0), ('\\textbf{(A)}\\ 0.5', '\\frac13', 0)],
    'lower_case_choice': [  # (b) is the choice B against a choice; alone, b stays a variable
        ('\\text{(b)}', 'B', 1), ('(b)', '(B)', 1), ('\\textbf{(e)}', '\\textbf{(E)}', 1), ('(c) 17', 'C', 1),
        ('(d)', 'D', 1), ('(b)', 'b', 1),
        ('\\text{(b)}', 'C', 0), ('(a)', 'B', 0), ('b', 'B', 0), ('(b)', 'c', 0), ('\\text{(d)}', '(E)', 0)],
    'segment_and_arc': [  # \overline{PQ} and the arc marks over point names are the name PQ
        ('\\overline{PQ}', 'PQ', 1), ('PQ', '\\overline{PQ}', 1), ('\\overline{AB}', '\\overline{AB}', 1),
        ('\\overarc{AB}', 'AB', 1), ('\\wideparen{ABC}', 'ABC', 1), ('\\overset{\\frown}{AC}', 'AC', 1),
        ("\\overline{A'B'}", "A'B'", 1), ('\\overline{AB} = 5', '5', 1),
        ('\\overline{PQ}', 'QP', 0), ('\\overline{PQ}', 'PR', 0), ('\\overline{z}', 'z', 0),
        ('0.\\overline{3}', '0.3', 0), ('\\overarc{AB}', 'AC', 0)],
    'scalar_times_matrix': [  # c M is the matrix of c times each entry
        ('\\frac{1}{2}\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix}', PMATRIX, 1),
        ('2\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}', '\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix}', 1),
        ('-\\begin{pmatrix}1\\\\-2\\end{pmatrix}', '\\begin{pmatrix}-1\\\\2\\end{pmatrix}', 1),
        ('\\frac{1}{5} \\begin{bmatrix} 5 & 10 \\end{bmatrix}', '(1, 2)', 1),
        ('3 \\cdot \\begin{pmatrix} 1 \\\\ 0 \\end{pmatrix}', '\\begin{pmatrix}3\\\\0\\end{pmatrix}', 1),
        ('\\frac12 \\left[\\begin{array}{cc} 2 & 4 \\\\ 6 & 8 \\end{array}\\right]', PMATRIX, 1),
        (PMATRIX, '\\frac{1}{2}\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix}', 1),
        ('A = ' + PMATRIX, PMATRIX, 1),
        ('\\frac{1}{2}\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix}', '\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix}', 0),
        ('2' + PMATRIX, PMATRIX, 0), ('-' + PMATRIX, PMATRIX, 0),
        ('x\\begin{pmatrix}1\\\\1\\end{pmatrix}', '(1, 1)', 0),
        ('\\frac{1}{2}\\begin{pmatrix}2&4&6&8\\end{pmatrix}', PMATRIX, 0)],
    'base_subscript': [  # the digits must agree; when both sides name a base, the values too
        ('3', '3_8', 1), ('1', '1_7', 1), ('3_8', '3', 1), ('3_{8}', '3', 1), ('204', '204_5', 1),
        ('1011', '1011_2', 1), ('3_{10}', '3_8', 1), ('5_{10}', '5', 1), ('5_{10}', '\\frac{10}{2}', 1),
        ('4', '3_8', 0), ('11', '1011_2', 0), ('3', '13_8', 0), ('12_{10}', '12_8', 0), ('1011_3', '1011_2', 0),
        ('8', '10_8', 0), ('3_8', '4', 0)],
}


@pytest.mark.parametrize('kind', sorted(UNSEEN_CLASSES))
def test_unseen_answer_classes_both_directions(kind):
    wrong = [(answer, gold, want) for answer, gold, want in UNSEEN_CLASSES[kind]
             if math_reward(box(answer), gold) != float(want)]
    assert wrong == [], kind


def test_unseen_answer_classes_through_the_official_shortcut():
    """A qualified value is a hedge: the official scorer's "\\text{ " cut does not make it right."""
    assert official_reward(box('12 \\text{ at most}'), '12') == 1.0
    assert reward_outcome(box('12 \\text{ at most}'), '12') == (0.0, 'wrong')
    assert grader.grade('\\text{about } 12', '\\text{about } 12', official_equal=True) == (1.0, 'right')
