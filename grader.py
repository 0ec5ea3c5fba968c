"""grader.py - is a LaTeX math answer equal to the ground truth? The reward of dsrl.py.

    grade(answer, gold, official_equal=False) -> (reward, outcome)

`answer` is the content of the response's last \\boxed{} (None when there is none), `gold` the
ground-truth string, `official_equal` the official Hendrycks string scorer's verdict on the whole
response (dsrl.official_reward, computed by the caller). The reward is 1.0 or 0.0; the outcome is one
of OUTCOMES. A call never raises and never runs longer than about TIME_BUDGET_S. The answer is never
eval'd or sympified: a small LaTeX parser builds a tuple tree, and numbers are compared exactly with
fractions.Fraction or numerically with mpmath. Standard library and mpmath only.

Command line, to see why a response got its reward:   python grader.py RESPONSE GOLD

Design (why it is safe and fast)
* Whatever the official string scorer accepts is right (the caller passes its verdict), except a
  hedge or a qualified value ("at least 12", below). Otherwise the answer and the gold are cleaned
  (units, \\text, \\left, degrees, \\$ ...), split into their structure (matrix / union / set / bracketed
  tuple or interval / list / relation / scalar), and each scalar is parsed into a tuple tree.
* Scalars are compared exactly when both are rational, otherwise numerically at 60 digits, at three
  fixed points when free variables appear. Identities agree to ~1e-55 and equality asks for 1e-40
  (relative), so a rounded decimal never equals an irrational.
* Everything is bounded before any maths: answer length, tokens, nesting depth, digits of a literal,
  bit size of a Fraction, and the magnitude of every numeric result (checked before each power, so a
  power tower stops at once). A cooperative deadline (time.monotonic, one per thread) is checked at
  every parser step and tree node: no signals, no helper process, so it works in any thread.
  Nothing unbounded such as sympy's simplify ever runs.

Rules for ambiguous cases
* Hedges: an answer joining guesses with "or"/"and" ("42 or 43", "42 \\text{ or } 43") is compared
  as the list it is: right against the gold "42, 43" (so "x=2 or x=3" equals "2, 3"), wrong against
  "42", even though the official scorer reads "\\text{ or } 43" as a unit and accepts it. A gold that
  hedges itself ("\\text{A or B}") keeps the official shortcut. A doubt word (maybe, possibly,
  either, probably, "?") makes the answer wrong.
* Multiple choice: a letter A-E alone, "(C)", "\\textbf{(C)}" or "(C) 12" (also "(C)12") is the choice
  C; when both sides are choices, only the letters are compared ("(C) 17" = C != "(D) 17"). A choice
  with its value also equals the value alone: "\\textbf{(C)}\\ 17" = 17, "(C) 18" != 17, and a bare
  "(C)" or "C" never equals a value. A lower-case "(b)" or "\\text{(b)}" is the choice B against a
  choice ("(b)" = B); against anything else it stays the variable b in brackets ("(b)" = b), so
  "(c) 17" != 17 (it reads as 17c), and a bare "b" is never a choice. "(A)+(B)" is not a choice.
* Percent: p\\%, "p percent" and p% equal both p and p/100 (50\\% = 50 = 0.5).
* Units and words after a number are dropped: 5\\text{ cm}^2 = 5, "125 miles" = 125, "5 apples" = 5,
  \\$5.00 = 5, "exactly 12" = 12. Other \\text{} wrappers are unwrapped.
* Qualifiers: a bound or an estimate (QUALIFIER_WORDS: at least, at most, more/less/fewer than, up to,
  about, approximately, roughly, nearly, ...) is not the value: "\\text{at least } 12", "about 12" and
  "12 \\text{ at most}" are wrong against 12, and 12 is wrong against a gold "at least 12". The words
  must be the same on both sides (then they go like units: "\\text{at least }12" = "at least 12"). Like
  a hedge, a qualified answer gets no official shortcut. The sign \\approx is no qualifier: it states a
  rounded value (below).
* Approximations: "x \\approx 2.45" or "\\sqrt{6} \\approx 2.45" matches by its exact form or by the
  stated value; a gold written two ways ("\\frac23 \\approx 0.67", "0.56=56") accepts either way.
  A rounded value never equals an exact irrational (1.414 != \\sqrt2, 0.33 != 1/3).
* Repeating decimals: 0.1\\overline{6} = 1/6, 1.\\overline{6} = 5/3.
* Degrees: ^\\circ, \\degree and the degree sign are dropped, never converted: 30^\\circ = 30, and
  90^\\circ != \\pi/2.
* Vectors: \\langle 1, 2\\rangle is the tuple (1, 2); a one-row or one-column matrix equals the tuple
  of its entries.
* Bases: a number with a base subscript (1011_2, 3_{8}, A2_{11}) is compared by its digits, and when
  both sides name a base, also by value: the subscript only names the base the problem asked for, so
  the same digits without it are right (3 = 3_8, 1011 = 1011_2, 5 = 5_{10}), the same value in other
  digits is not (11 != 1011_2, 8 != 10_8), nor the same digits in another base (12_{10} != 12_8, though
  3_{10} = 3_8). An explicit base 10 is also its decimal value (5_{10} = \\frac{10}{2}). Without the
  problem the checker trusts the digits: a bare 1011 against 1011_2 is almost surely the base-2 answer
  with its subscript left out, hardly the decimal one thousand and eleven.
* Thousands separators: 1,386 = 1{,}386 = 1\\,386 = 1386, also inside a scalar (\\frac{1}{29,322,216}).
  Digit groups of three after 1-3 leading digits, joined by ",\\!", "{,}", "\\,", "\\!", "\\ ", "~" or a
  space, are one number anywhere, also inside a tuple: 1,\\!234,\\!567 = 1\\,234\\,567 = 1 234 567 =
  1234567, (1,\\!234, 5) = (1234, 5); "1 234" != 234. A bare "1,234" inside brackets still separates.
* Ambiguous: a plain comma between digit groups of three ("30,150", "1,657") is a thousands number or a
  list of two answers, and only the problem's wording tells which (in MATH train 42 of 45 such golds are
  numbers, 3 are lists of angles or roots). Both readings are accepted, on either side: "30150",
  "150, 30" and "150^\\circ, 30^\\circ" all equal "30,150"; refused are what matches neither ("30",
  "3015", "30, 151"). So the one number 30150 stays right against a gold that meant two angles: refusing
  it would also refuse the 93 % of such golds that are numbers. A group starting with 0 ("1,000") or a
  decimal ("306,956.63") is a number only; "1{,}000", "1,\\!000" and "1, 000" are what they say.
* Lists: a bare comma list is a set of answers, unordered ("1, 2" = "2, 1"), as is \\{1, 2\\}; a
  ';' list is ordered; tuples and intervals are ordered and their brackets matter ((1,2) != [1,2]);
  one root of several is wrong. A union of intervals is unordered. Ambiguous: a ranking or sequence
  written as a bare list ("3, 1, 2") is ordered only in the problem's wording, which the checker does
  not see: it is compared as a set, so a ranking in another order is accepted. Bare lists in golds
  are mostly "enter all solutions, separated by commas", where any order is right.
* Intervals and inequalities: a one-variable inequality equals its interval ("x < 1" =
  (-\\infty, 1), "2 < x \\le 5" = (2, 5]). Two inequalities with two sides each are compared after
  turning > into < (2 \\le x = x \\ge 2), and also match when right minus left of one is a positive
  multiple of the other's (x+y<3 = 2x+2y<6). Longer chains are compared side by side, in order.
* Unions of inequalities: "or" (also \\text{ or }, \\quad\\text{or}\\quad, \\cup) between inequalities in ONE
  variable is the union of their intervals, unordered: "x \\le 2 \\text{ or } x > 5" =
  (-\\infty,2]\\cup(5,\\infty); a point "x = 7" may join them as \\{7\\}. "or" between numbers or between
  equations alone stays a hedge / list of roots ("2 or 5" != the union; "x=2 or x=3" = "2, 3"), and two
  variables ("x < 1 or y > 2") are no union.
* All reals: \\mathbb{R}, \\mathbb R, \\R, "all real numbers" / "all reals" / "all real x" (any case, also
  after "x \\in") are (-\\infty,\\infty), as is -\\infty < x < \\infty; \\mathbb{R}^+, \\mathbb{R}^2,
  \\mathbb{R}\\setminus\\{0\\} and "all real numbers except 2" are not.
* Equations: "x = 5" against "5" compares the right-hand side; two equations are equal when their
  sides match or one is a non-zero multiple of the other (2x+2y=2 = x+y=1). A leading "x \\in" is
  dropped.
* Segments and arcs: \\overline{PQ}, \\overarc{AB}, \\wideparen{ABC}, \\overset{\\frown}{AC} over the names
  of two or more points (capitals, primes allowed) are the name itself: \\overline{PQ} = PQ. The letters
  keep their order (\\overline{PQ} != QP: a name cannot be told from a code word); \\overline over
  anything else stays what it was (\\overline{z} is a conjugate, 0.\\overline{3} a repeating decimal).
* Multi-letter words are text, compared without case ("Sunday"), never as a product of variables
  (LQXS != LQSX); a single letter is a variable, except e and i (Euler's number, imaginary unit).
* Free variables are sampled at positive points (0.25 to 2.25), so \\sqrt{x^2} = x and |x| = x.
* Matrices: any matrix environment, entries compared in order with the same shape; a normalised gold
  that lost its "\\\\" before a command (-\\sqrt{3}/2\\sqrt{3}/2) is re-split into cells. An environment
  inside ( ) or [ ] is that matrix: \\left[\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right] = the pmatrix or
  bmatrix, with or without the column spec; \\hline is ignored. Shapes must agree (1x4 != 2x2) unless
  both are vectors (a row equals the column of the same entries); | | around an array is a determinant.
  A scalar factor in front is multiplied into every entry: \\frac12\\begin{pmatrix}2&4\\\\6&8\\end{pmatrix} =
  \\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}, -\\begin{pmatrix}1\\\\-2\\end{pmatrix} = (-1, 2), 2M != M; the factor must
  parse as a scalar ("A = M" stays an equation), and never scales a determinant (c|M| != |cM|).
* Invisible delimiters: a \\left/\\right pair with a '.' side is decoration and is dropped whole, its
  other side too: \\left. 5 \\right. = 5, \\left. \\frac12 \\right| = 1/2, \\left\\{ 1, 2 \\right. = "1, 2".
  A visible pair stays (\\left| -3 \\right| = 3).
* Empty gold: a gold with nothing in it (blank, only $ or spacing, \\text{ }) is never matched, not even
  through the official shortcut: any answer is "wrong" (no box: "no_box"), reward 0.
* \\pm: one \\pm (or \\mp) is the list of both values (\\pm 3 = "3, -3"; 3 != \\pm 3).
* Empty set: \\emptyset, \\varnothing, \\{\\}, "empty", "none" (any case) are all the empty set.
* Numbers: 2\\frac14 is a mixed number (9/4), and so is a negative one: -3\\frac18 = -(3 + 1/8) = -25/8, never
  -3 x 1/8 (a fraction of letters stays a product: -3\\frac{x}{8} = -3x/8); 3.2e7 = 3.2 \\times 10^7;
  a \\over b = \\frac{a}{b}.
* Limits: an answer or gold over MAX_ANSWER_CHARS is "unparseable" (only the official shortcut can
  make it right), as is an overflow or a division by zero; a scalar that does not parse is "wrong".
"""

import math
import random
import re
import sys
import threading
import time
from fractions import Fraction

import mpmath  # installed with sympy; the only dependency

OUTCOMES = ("right", "wrong", "no_box", "unparseable", "timeout")

# ---------------------------------------------------------------- limits and precision
MAX_ANSWER_CHARS = 1000   # longer answers or golds only get the official string check
MAX_TOKENS = 400          # tokens per scalar expression
MAX_DEPTH = 40            # parser recursion depth
MAX_LITERAL_DIGITS = 300  # digits in one number literal
MAX_EXACT_BITS = 20000    # Fraction numerator/denominator size before falling back to mpmath
MAX_MAGNITUDE_BITS = 4000  # |value| < 2**4000 for every intermediate numeric result
MAX_ELEMENTS = 60         # elements in a list / set / matrix
TIME_BUDGET_S = 0.5       # cooperative deadline for one grade() call
SAMPLE_POINTS = 3         # evaluation points when free variables are present
DIGITS = 60               # mpmath working precision (decimal digits)
RELATIVE_TOLERANCE = '1e-40'  # numeric equality at that precision

# ---------------------------------------------------------------- words
UNIT_WORDS = ('units', 'unit', 'square', 'sq', 'cubic', 'cm', 'mm', 'km', 'meters', 'meter',
              'inches', 'inch', 'feet', 'foot', 'ft', 'miles', 'mile', 'mph', 'yards', 'yard',
              'dollars', 'dollar', 'cents', 'cent', 'degrees', 'degree', 'hours', 'hour',
              'minutes', 'minute', 'seconds', 'second', 'days', 'day', 'years', 'year',
              'pounds', 'ounces', 'grams', 'kg', 'liters', 'gallons', 'people', 'students',
              'ways', 'times', 'points', 'pages', 'cups', 'm', 'g', 's', 'min', 'hr')
HEDGE_WORDS = ('or', 'and')            # "42 or 43" becomes the list "42, 43"
DOUBT_WORDS = ('maybe', 'possibly', 'either', 'probably', '?')   # "maybe 42" is wrong
QUALIFIER_WORDS = ('no more than', 'no less than', 'no fewer than', 'not more than', 'not less than', 'at least',
                   'at most', 'more than', 'less than', 'fewer than', 'greater than', 'smaller than', 'up to',
                   'approximately', 'approx', 'about', 'around', 'roughly', 'nearly', 'almost', 'circa')
FUNCTIONS = ('arcsin', 'arccos', 'arctan', 'sinh', 'cosh', 'tanh', 'sin', 'cos', 'tan', 'sec',
             'csc', 'cot', 'ln', 'log', 'exp')
GREEK = ('alpha', 'beta', 'gamma', 'delta', 'theta', 'phi', 'varphi', 'lambda', 'mu', 'omega',
         'sigma', 'tau', 'rho', 'psi', 'epsilon', 'varepsilon', 'eta', 'kappa', 'nu', 'xi', 'zeta')
EMPTY_WORDS = ('\\emptyset', '\\varnothing', 'empty', 'none', '\\{\\}', '{}', 'emptyset')
_OPERATOR_COMMANDS = ('cdot', 'times', 'ast', 'div')
_KNOWN_COMMANDS = FUNCTIONS + _OPERATOR_COMMANDS + GREEK + ('frac', 'sqrt', 'pi', 'infty', 'binom')
_COMMANDS_LONGEST_FIRST = sorted(_KNOWN_COMMANDS, key=len, reverse=True)  # "\secx" is \sec x

# ---------------------------------------------------------------- patterns
_BOX_RE = re.compile(r'\\(?:boxed|fbox)(?![a-zA-Z])')
_SPACING_RE = re.compile(r'\\(?:left|right|big|Big|bigg|Bigg|displaystyle|textstyle|limits)'
                         r'(?![a-zA-Z])|(?<!\\)\\[,;:! ]|\\q?quad(?![a-zA-Z])|~')
_TEXT_COMMAND_RE = re.compile(r'\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|'
                              r'textnormal|operatorname|boxed|fbox)\s*\{')
_DEGREES_RE = re.compile(r'\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree')
_HEDGE_TEXT_RE = re.compile(r'\\(?:text|textrm|textit|textbf|textnormal|mbox|mathrm)\s*\{\s*(%s)\s*\}'
                            % '|'.join(HEDGE_WORDS))
_HEDGE_SPACED_RE = re.compile(r'\s+(%s)\s+' % '|'.join(HEDGE_WORDS))
_OR = '\\lor'  # "or" becomes \lor, "and" a comma: both separate a list, \lor also a union of inequalities
_OR_RE = re.compile(r'\\lor(?![a-zA-Z])')
_DELIMITER_RE = re.compile(r'\\(left|right)(?![a-zA-Z])\s*(\\[a-zA-Z]+|\\.|.)?', re.S)
_DIGIT_GROUP_RE = re.compile(r'(?<![\d.^_])\d{1,3}(?:(?:,\\!|\{,\}|\\[,!]|\\thinspace|\\ |~|\s)\s*\d{3}(?!\d))+')
_EMPTY_GOLD_RE = re.compile(r'[\s$~]|\\[,;:! ]|\\q?quad(?![a-zA-Z])|\\(?:text|mbox|mathrm)\{\s*\}')
_ALL_REALS_RE = re.compile(r'\\mathbb\s*\{\s*R\s*\}|\\mathbb\s*R|\\R|(?i:(?:the\s+set\s+of\s+)?(?:all|any|every)'
                           r'\s+real(?:s|\s+numbers?|\s+values?)?(?:\s+(?:of\s+)?[a-z])?)')
_ALL_REALS = '(-\\infty,\\infty)'
_PERCENT_RE = re.compile(r'\\%|\\text\{\s*percent\s*\}|\s*percent\b')
_DOUBT_RE = re.compile(r'(?<![a-z])(?:%s)(?![a-z])' % '|'.join(re.escape(w) for w in DOUBT_WORDS))
_HEDGE_RE = re.compile(r'(?<![a-zA-Z])(?:%s)(?![a-zA-Z])' % '|'.join(HEDGE_WORDS + DOUBT_WORDS[:-1]))
_QUALIFIER_RE = re.compile(r'(?i)(?<![a-zA-Z\\])(?:%s)(?![a-zA-Z])' % '|'.join(
    w.replace(' ', r'\s+') for w in QUALIFIER_WORDS))  # "\approx" is a sign, not the word
_LONG_UNIT_RE = re.compile(r'(?<=[\d}\s)])\s*(?:%s)\.?(?:\^\{?[23]\}?)?\s*$' % '|'.join(
    w for w in UNIT_WORDS if len(w) > 1))
_SHORT_UNIT_RE = re.compile(r'(?<=\d)\s+(?:%s)\s*$' % '|'.join(w for w in UNIT_WORDS if len(w) == 1))
_POINT_NAMES = r"\s*([A-Z]'*(?:\s*[A-Z]'*)+)\s*"  # names of two or more points: AB, A'B', ABC
_SEGMENT_RE = re.compile(r'\\(?:overline|overarc|wideparen|overparen|arc)\s*\{%s\}|'
                         r'\\(?:overset|stackrel)\s*\{\s*\\frown\s*\}\s*\{%s\}' % (_POINT_NAMES, _POINT_NAMES))
_REPEATING_RE = re.compile(r'(\d*)\.(\d*)\\overline\{(\d{1,30})\}')
_APPROX_RE = re.compile(r'\\approx|≈')
_THOUSANDS_RE = re.compile(r'^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$')
_MATRIX_RE = re.compile(r'^\\begin\{([pbvBV]?matrix|array)\}(?:\{[lcr|\s]*\})?(.*)\\end\{\1\}$', re.S)
# a matrix inside ( ) or [ ]: (\begin{array}..)
_BRACKETED_MATRIX_RE = re.compile(r'^(?:\(\s*(\\begin\{.*\})\s*\)|\[\s*(\\begin\{.*\})\s*\])$', re.S)
_RELATION_RE = re.compile(r'\\leq?(?![a-zA-Z])|\\geq?(?![a-zA-Z])|\\[lg]t(?![a-zA-Z])|<=|>=|[<>=]|≤|≥')
_UNION_RE = re.compile(r'\\cup(?![a-zA-Z])|∪')
_TOKEN_RE = re.compile(r'(\d+\.?\d*|\.\d+)|\\([a-zA-Z]+)|([a-zA-Z])|(\S)')
_RELATION_SYMBOLS = {'le': '<=', 'leq': '<=', 'lt': '<', '≤': '<=', 'ge': '>=', 'geq': '>=', 'gt': '>',
                     '≥': '>='}
_CLOSING = {'(': ')', '[': ']', '{': '}', '|': '|'}


class _OutOfTime(Exception):
    """The call's deadline passed."""


class _Unparseable(Exception):
    """Unparseable or out-of-bounds input."""


class _NoExactValue(Exception):
    """Irrational, has variables, or too big for a Fraction: compare numerically instead."""


# ---------------------------------------------------------------- deadline and precision, per thread
_thread_state = threading.local()


def _mpmath_context():
    """This thread's own mpmath context: some mpmath functions raise ctx.prec for a while, so a
    shared context could race between threads (and the global mpmath.mp is never touched)."""
    context = getattr(_thread_state, 'mpmath', None)
    if context is None:
        context = _thread_state.mpmath = mpmath.MPContext()
        context.dps = DIGITS
    return context


def _check_deadline():
    if time.monotonic() > getattr(_thread_state, 'deadline', float('inf')):
        raise _OutOfTime()


# ---------------------------------------------------------------- brackets and boxes
def _group_end(s, i):
    """Index just past the group opened at s[i] == '{', or -1 if unbalanced."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == '{':
            depth += 1
        elif s[j] == '}':
            depth -= 1
            if depth == 0:
                return j + 1
    return -1


def _closes_at_end(s, i):
    """True if the bracket opened at s[i] closes exactly at the end of s."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] in '([{') - (s[j] in ')]}')
        if depth == 0:
            return j == len(s) - 1
    return False


def _split_top_level(s, pattern):
    """Split s on regex `pattern` at bracket depth 0 -> (parts, separators)."""
    parts, separators, depth, start, i = [], [], 0, 0, 0
    separator = re.compile(pattern)
    while i < len(s):
        c = s[i]
        if c in '([{':
            depth += 1
        elif c in ')]}':
            depth -= 1
        elif depth == 0:
            m = separator.match(s, i)
            if m and m.end() > i:
                parts.append(s[start:i])
                separators.append(m.group(0))
                start = i = m.end()
                continue
        i += 1
    parts.append(s[start:])
    return parts, separators


def last_box(text):
    """Content of the last top-level \\boxed{}/\\fbox{} (or `\\boxed 5`); None if absent or cut off. The answer
    training reads (dsrl.last_boxed), evaluation votes on and the command line grades: one implementation."""
    if not isinstance(text, str):
        return None
    found, end_of_found = None, 0
    for m in _BOX_RE.finditer(text):
        if m.start() < end_of_found:
            continue  # nested inside the previous box: the outer one wins
        j = m.end()
        while j < len(text) and text[j] == ' ':
            j += 1
        if j < len(text) and text[j] == '{':
            end = _group_end(text, j)
            if end < 0:
                return None  # the final box was cut off: no answer
            found, end_of_found = text[j + 1:end - 1], end
        elif j > m.end():  # "\boxed 5" form: up to '$' or the end of the line
            tail = re.match(r'[^$\n]*', text[j:]).group(0)
            found, end_of_found = tail.strip(), j + len(tail)
    return found


# ---------------------------------------------------------------- cleaning
def _unwrap_text_commands(s):
    """\\text{..}-like wrappers: drop pure-word ones next to a number (units), unwrap the rest."""
    for _ in range(50):
        m = _TEXT_COMMAND_RE.search(s)
        if not m:
            return s
        end = _group_end(s, m.end() - 1)
        if end < 0:
            raise _Unparseable()
        inner, rest = s[m.end():end - 1], s[:m.start()] + s[end:]
        if re.fullmatch(r'[A-Za-z .\-]*', inner) and re.search(r'\d|\\pi', rest) \
                and not m.group(0).startswith(('\\boxed', '\\fbox', '\\operatorname')):
            power = re.match(r'\s*\^\s*\{?\s*[23]\s*\}?', s[end:])  # "cm^2"
            s = s[:m.start()] + s[end + (power.end() if power else 0):]
        else:
            s = s[:m.start()] + inner + s[end:]
    raise _Unparseable()


def _repeating_decimal_as_fraction(m):
    """A.B(C repeating) -> \\frac{p}{q}: A + (BC - B) / (10^|B| (10^|C| - 1))."""
    whole, fixed, repeated = m.group(1) or '0', m.group(2)[:30], m.group(3)
    value = int(whole) + Fraction(int(fixed + repeated) - int(fixed or '0'),
                                  10 ** len(fixed) * (10 ** len(repeated) - 1))
    return '\\frac{%d}{%d}' % (value.numerator, value.denominator)


def _drop_invisible_delimiters(s):
    """\\left. x \\right| -> x: a \\left/\\right pair with an invisible side ('.') is decoration, dropped
    whole (a lone \\left. or \\right. too). Visible pairs stay: \\left| -3 \\right| is |-3|."""
    if '\\left' not in s and '\\right' not in s:
        return s
    opened, spans = [], []
    for m in _DELIMITER_RE.finditer(s):
        if m.group(1) == 'left':
            opened.append(m)
        elif opened:
            left = opened.pop()
            if '.' in (left.group(2), m.group(2)):
                spans += [left.span(), m.span()]
        elif m.group(2) == '.':
            spans.append(m.span())
    spans += [m.span() for m in opened if m.group(2) == '.']
    for start, end in sorted(spans, reverse=True):
        s = s[:start] + ' ' + s[end:]
    return s


def _hedge_separator(m):
    return ' %s ' % _OR if m.group(1) == 'or' else ','


def _normalise_symbols(s):
    """Control characters, \\dfrac, digit groups, spacing, dollars, degrees, infinity, hedge words, percent."""
    s = re.sub(r'[\x00-\x1f\x7f]', ' ', s)
    s = re.sub(r'\\[dtc]frac', r'\\frac', s)
    s = _DIGIT_GROUP_RE.sub(lambda m: re.sub(r'\D', '', m.group(0)), _drop_invisible_delimiters(s))
    s = _SPACING_RE.sub('', s).replace('\\$', '').replace('$', '')
    s = _DEGREES_RE.sub('', s)
    s = s.replace('∞', '\\infty').replace('\\infin ', '\\infty')
    s = _HEDGE_TEXT_RE.sub(_hedge_separator, s)
    s = _HEDGE_SPACED_RE.sub(_hedge_separator, s)
    s = re.sub(r',\s*(?=\\lor(?![a-zA-Z]))|,\s*(?=,)', '', s)  # "1, 2, or 3": the comma before "or" goes
    return _PERCENT_RE.sub('%', s)


def _rewrite_notation(s):
    """\\overline{PQ}, \\over, trailing units, "x \\in", 3.2e7, repeating decimals, \\langle\\rangle."""
    s = _SEGMENT_RE.sub(lambda m: re.sub(r'\s', '', m.group(1) or m.group(2)), s)  # \overline{PQ} -> PQ
    if re.search(r'\\over(?![a-zA-Z])', s):
        numerator, denominator = re.split(r'\\over(?![a-zA-Z])', s, maxsplit=1)
        s = '\\frac{%s}{%s}' % (numerator, denominator)
    s = _LONG_UNIT_RE.sub('', s)
    s = _SHORT_UNIT_RE.sub('', s)
    s = re.sub(r'^[a-zA-Z]\s*\\in(?![a-zA-Z])\s*', '', s.replace('{,}', ',').strip())
    s = re.sub(r'^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$', r'\1\\times10^{\2}', s)
    s = _REPEATING_RE.sub(_repeating_decimal_as_fraction, s)
    return re.sub(r'\\langle(?![a-zA-Z])', '(', re.sub(r'\\rangle(?![a-zA-Z])', ')', s))


def _peel(s):
    """Trailing punctuation, a leading \\approx and braces around the whole answer."""
    for _ in range(20):
        before = s
        s = re.sub(r'^\\approx|[.,\s]+$', '', s).strip()
        if s.startswith('{') and _closes_at_end(s, 0):
            s = s[1:-1].strip()
        if s == before:
            break
    return s


def _clean_answer(s):
    """Canonical LaTeX for structural comparison (None = doubtful or empty answer)."""
    s = _normalise_symbols(s)
    if _DOUBT_RE.search(s.lower()):
        return None
    s = _peel(_rewrite_notation(_unwrap_text_commands(s)))
    if s.lower() in EMPTY_WORDS or s in ('\\{ \\}', '\\{\\}'):
        s = '\\emptyset'
    if _ALL_REALS_RE.fullmatch(s):
        s = _ALL_REALS
    return s or None


def _comma_readings(s):
    """"30,150" is one number with a thousands comma and also the list "30, 150": both readings; "1,000" is
    only a number (a list member is not written "000"), and "1, 2" or "1{,}000" only what they are."""
    if not _THOUSANDS_RE.match(s):
        return [s]
    number = s.replace(',', '')
    return [number] if re.search(r',0|\.', s) else [number, s]


def _text_form(s):
    """The answer as text: no spaces or braces, and a word of 2+ letters without case."""
    s = re.sub(r'[\s{}]|\\(?=[{}])', '', s)
    return s.lower() if re.fullmatch(r'[A-Za-z]{2,}', s) else s


def _choice(s, lower_case=False, last='E'):
    """A multiple-choice answer: "C", "(C)" or "(C) 12" (spaces may be gone: "(C)12") -> ("C", "12" or None);
    letters A to `last`. A lower-case "(c)" only when lower_case (against another choice: alone it is the
    variable c)."""
    both = 'A-%sa-%s' % (last, last.lower())
    letters = both if lower_case else 'A-' + last
    m = re.fullmatch(r'\(([%s])\)(?!\s*[-+*/^=,]|.*\([%s]\))\s*(.*)|([A-%s])' % (letters, both, last), s.strip(), re.S)
    return ((m.group(1) or m.group(3)).upper(), m.group(2) or None) if m else None  # not "(A)+(B)"


def _choice_letter(s, last='E'):
    """The letter of a multiple-choice answer ("(C) 12" -> "C"), or None; letters A to `last`."""
    return (_choice(s, last=last) or (None,))[0]


# ---------------------------------------------------------------- LaTeX -> tuple tree
def _known_command_tokens(name):
    """Tokens of the command \\name; "\\sinx", "\\secx" (normalised golds glue the argument) split."""
    if name in _KNOWN_COMMANDS:
        return [('var', name) if name in GREEK else ('cmd', name)]
    head = next((k for k in _COMMANDS_LONGEST_FIRST if name.startswith(k)), None)
    if head is None:
        raise _Unparseable()
    return [('cmd', head)] + [('var', c) for c in name[len(head):]]


def _tokenize(s):
    """(kind, value) pairs with kind in num / cmd / var / op."""
    tokens = []
    for m in _TOKEN_RE.finditer(s):
        number, command, letter, symbol = m.groups()
        if number:
            if len(number) > MAX_LITERAL_DIGITS:
                raise _Unparseable()
            tokens.append(('num', number))
        elif command:
            tokens.extend(_known_command_tokens(command))
        else:
            tokens.append(('var', letter) if letter else ('op', symbol))
    if len(tokens) > MAX_TOKENS:
        raise _Unparseable()
    return tokens


class _LatexParser:
    """Recursive descent into tuple trees such as ('add', ('num', Fraction(1)), ('var', 'x')).
    expression := term (+|- term)*; term := unary ((*|/) unary | power)*; unary := (+|-)* power;
    power := atom !* (^ exponent)?; atom := number | variable | (expression) | \\command."""

    def __init__(self, text):
        self.tokens, self.position, self.depth = _tokenize(text), 0, 0

    def peek(self):
        return self.tokens[self.position] if self.position < len(self.tokens) else (None, None)

    def take(self):
        token = self.peek()
        self.position += 1
        return token

    def expect(self, value):
        if self.take()[1] != value:
            raise _Unparseable()

    def descend(self):
        """One level deeper: bounded depth, and the deadline is checked at every step."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unparseable()
        _check_deadline()

    def parse(self):
        node = self.expression()
        if self.position != len(self.tokens):
            raise _Unparseable()
        return node

    def expression(self):
        self.descend()
        node = self.term()
        while self.peek()[1] in ('+', '-'):
            sign = self.take()[1]
            rhs = self.term()
            node = ('add', node, rhs if sign == '+' else ('neg', rhs))
        self.depth -= 1
        return node

    def starts_atom(self):
        kind, value = self.peek()
        return kind in ('num', 'var') or (kind == 'op' and value in '([{') or \
            (kind == 'cmd' and value not in _OPERATOR_COMMANDS)

    def term(self):
        node = self.unary()
        negative = node[0] == 'neg' and node[1][0] == 'num'  # -3\frac18 = -(3 + 1/8), not -3 * 1/8
        whole = node[1] if negative else node
        if whole[0] == 'num' and whole[1].denominator == 1 and self.peek() == ('cmd', 'frac'):
            fraction = self.power()  # mixed number 2\frac14 = 2 + 1/4
            if fraction[1][0] == fraction[2][0] == 'num':
                return ('neg', ('add', whole, fraction)) if negative else ('add', whole, fraction)
            return ('mul', node, fraction)
        while True:
            kind, value = self.peek()
            if value == '*' or (kind == 'cmd' and value in ('cdot', 'times', 'ast')):
                self.take()
                node = ('mul', node, self.unary())
            elif value == '/' or (kind == 'cmd' and value == 'div'):
                self.take()
                node = ('div', node, self.unary())
            elif self.starts_atom():
                node = ('mul', node, self.power())  # implicit multiplication
            else:
                return node

    def unary(self):
        if self.peek()[1] in ('+', '-'):
            sign = self.take()[1]
            self.descend()
            node = self.unary()
            self.depth -= 1
            return node if sign == '+' else ('neg', node)
        return self.power()

    def power(self):
        node = self.atom()
        while self.peek()[1] == '!':
            self.take()
            node = ('fact', node)
        if self.peek()[1] == '^':
            self.take()
            node = ('pow', node, self.exponent())
        return node

    def single_digit(self):
        """LaTeX takes one character as an ungrouped argument: \\frac34, x^23."""
        kind, value = self.peek()
        if kind == 'num' and len(value) > 1 and value[0] != '.':
            self.tokens[self.position] = ('num', value[1:])
            return ('num', Fraction(value[0]))
        return None

    def exponent(self):
        self.descend()
        if self.peek()[1] in ('+', '-'):
            node = self.unary()
        else:
            node = self.single_digit() or self.atom()
            if self.peek()[1] == '^':  # 9^9^9 is right-associative
                self.take()
                node = ('pow', node, self.exponent())
        self.depth -= 1
        return node

    def argument(self):
        return self.single_digit() or self.atom()

    def atom(self):
        self.descend()
        kind, value = self.take()
        if kind == 'num':
            node = self.number(value)
        elif kind == 'var':
            node = self.variable(value)
        elif kind == 'op' and value in '([{|':
            node = self.expression()
            self.expect(_CLOSING[value])
            node = ('abs', node) if value == '|' else node
        elif kind == 'cmd':
            node = self.command(value)
        else:
            raise _Unparseable()
        self.depth -= 1
        return node

    def number(self, literal):
        if self.peek()[1] == '_' or not literal.strip('.'):
            raise _Unparseable()  # base-n literal such as 10001_2 (compared by its digits), or the '.' of "\frac1."
        return ('num', Fraction(literal.rstrip('.') if literal.endswith('.') else literal))

    def variable(self, name):
        if self.peek()[1] != '_':
            return ('const', name) if name in ('e', 'i') else ('var', name)
        self.take()
        return ('var', name + '_' + repr(self.argument()))  # x_1, x_{n+1}: one variable

    def command(self, name):
        if name in ('frac', 'binom'):
            return ('div' if name == 'frac' else 'binom', self.argument(), self.argument())
        if name == 'sqrt':
            index = ('num', Fraction(2))
            if self.peek()[1] == '[':
                self.take()
                index = self.expression()
                self.expect(']')
            return ('root', index, self.argument())
        if name in ('pi', 'infty'):
            return ('const', name)
        if name in FUNCTIONS:
            return self.function_call(name)
        raise _Unparseable()

    def function_call(self, name):
        """\\sin^2 x, \\log_2 8, \\ln(x): optional power and base, then the argument."""
        power = base = None
        if self.peek()[1] == '^':
            self.take()
            power = self.exponent()
        if name == 'log' and self.peek()[1] == '_':
            self.take()
            base = self.argument()
        if self.peek()[1] in ('(', '{'):
            arg = self.atom()
        else:  # \sin 2x: the argument runs until the next operator or function
            arg = self.power()
            while self.starts_atom() and self.peek()[1] not in FUNCTIONS:
                arg = ('mul', arg, self.power())
        node = ('log', base, arg) if base else ('func', name, arg)
        return ('pow', node, power) if power else node


def _parse(text):
    return _LatexParser(text).parse()


# ---------------------------------------------------------------- exact value (Fraction)
def _bit_size(q):
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _exact_power(node):
    base, exponent = _exact_value(node[1]), _exact_value(node[2])
    if exponent.denominator != 1 or _bit_size(base) * abs(exponent) > MAX_EXACT_BITS:
        raise _NoExactValue()
    if base == 0 and exponent < 0:
        raise _Unparseable()
    return base ** int(exponent)


def _exact_binomial(node):
    n, k = _exact_value(node[1]), _exact_value(node[2])
    if n.denominator != 1 or k.denominator != 1 or not 0 <= k <= n <= 2000:
        raise _NoExactValue()
    return Fraction(math.comb(int(n), int(k)))


def _exact_value(node):
    """Exact rational value, or _NoExactValue (irrational / variables / too big)."""
    _check_deadline()
    tag = node[0]
    if tag == 'num':
        return node[1]
    if tag == 'neg':
        return -_exact_value(node[1])
    if tag in ('add', 'mul', 'div'):
        a, b = _exact_value(node[1]), _exact_value(node[2])
        if tag == 'div' and b == 0:
            raise _Unparseable()
        value = a + b if tag == 'add' else a * b if tag == 'mul' else a / b
    elif tag == 'pow':
        value = _exact_power(node)
    elif tag == 'binom':
        value = _exact_binomial(node)
    else:
        raise _NoExactValue()
    if _bit_size(value) > MAX_EXACT_BITS:
        raise _NoExactValue()
    return value


# ---------------------------------------------------------------- numeric value (mpmath)
def _check_magnitude(value):
    mp = _mpmath_context()
    if mp.isnan(value) or (not mp.isinf(value) and value != 0 and mp.mag(value) > MAX_MAGNITUDE_BITS):
        raise _Unparseable()  # overflow guard: keeps every later operation cheap
    return value


_FUNCTION_VALUES = {
    'sin': lambda mp, x: mp.sin(x), 'cos': lambda mp, x: mp.cos(x), 'tan': lambda mp, x: mp.tan(x),
    'sec': lambda mp, x: 1 / mp.cos(x), 'csc': lambda mp, x: 1 / mp.sin(x),
    'cot': lambda mp, x: 1 / mp.tan(x), 'arcsin': lambda mp, x: mp.asin(x),
    'arccos': lambda mp, x: mp.acos(x), 'arctan': lambda mp, x: mp.atan(x),
    'sinh': lambda mp, x: mp.sinh(x), 'cosh': lambda mp, x: mp.cosh(x), 'tanh': lambda mp, x: mp.tanh(x),
    'ln': lambda mp, x: mp.log(x), 'log': lambda mp, x: mp.log(x), 'exp': lambda mp, x: mp.exp(x)}
_CONSTANT_VALUES = {'pi': lambda mp: +mp.pi, 'e': lambda mp: +mp.e, 'i': lambda mp: mp.mpc(0, 1),
                    'infty': lambda mp: mp.inf}


def _numeric_arithmetic(node, env):
    tag, mp = node[0], _mpmath_context()
    a, b = _numeric_value(node[1], env), _numeric_value(node[2], env)
    if tag == 'div' and abs(b) < mp.mpf(2) ** -MAX_MAGNITUDE_BITS:
        raise _Unparseable()
    return _check_magnitude(a + b if tag == 'add' else a * b if tag == 'mul' else a / b)


def _numeric_power(node, env):
    mp = _mpmath_context()
    base, exponent = _numeric_value(node[1], env), _numeric_value(node[2], env)
    if base == 0:
        if mp.re(exponent) <= 0:
            raise _Unparseable()
        return base
    if abs(exponent) * (abs(mp.log(abs(base), 2)) + 1) > MAX_MAGNITUDE_BITS:
        raise _Unparseable()  # 9^9^9^9 and friends stop here, before mpmath tries
    return _check_magnitude(mp.power(base, exponent))


def _numeric_factorial(node, env):
    x = _numeric_value(node[1], env)
    if abs(x) > 1000:
        raise _Unparseable()
    return _check_magnitude(_mpmath_context().gamma(x + 1))


def _numeric_root(node, env):
    mp = _mpmath_context()
    index, x = _numeric_value(node[1], env), _numeric_value(node[2], env)
    if index == 0:
        raise _Unparseable()
    if mp.im(x) == 0 and x < 0 and index == int(index) and int(index) % 2:  # real odd root
        return -mp.root(-x, int(index))
    return _check_magnitude(mp.power(x, 1 / index))


def _numeric_function(node, env):
    x = _numeric_value(node[2], env)
    if abs(x) > 2 ** 64:
        raise _Unparseable()
    return _check_magnitude(_FUNCTION_VALUES[node[1]](_mpmath_context(), x))


def _numeric_binomial(node, env):
    n, k = _numeric_value(node[1], env), _numeric_value(node[2], env)
    if abs(n) > 1000 or abs(k) > 1000:
        raise _Unparseable()
    return _check_magnitude(_mpmath_context().binomial(n, k))


def _numeric_logarithm(node, env):
    mp = _mpmath_context()
    return _check_magnitude(mp.log(_numeric_value(node[2], env)) / mp.log(_numeric_value(node[1], env)))


_NUMERIC_RULES = {
    'neg': lambda node, env: -_numeric_value(node[1], env),
    'abs': lambda node, env: abs(_numeric_value(node[1], env)),
    'add': _numeric_arithmetic, 'mul': _numeric_arithmetic, 'div': _numeric_arithmetic,
    'pow': _numeric_power, 'fact': _numeric_factorial, 'root': _numeric_root,
    'func': _numeric_function, 'binom': _numeric_binomial, 'log': _numeric_logarithm}


def _numeric_value(node, env):
    """60-digit value of the tree at the point `env`; _Unparseable on overflow / division by zero."""
    _check_deadline()
    tag = node[0]
    if tag == 'num':
        return _mpmath_context().mpf(node[1].numerator) / node[1].denominator
    if tag == 'var':
        return env[node[1]]
    if tag == 'const':
        return _CONSTANT_VALUES[node[1]](_mpmath_context())
    if tag not in _NUMERIC_RULES:
        raise _Unparseable()
    return _NUMERIC_RULES[tag](node, env)


# ---------------------------------------------------------------- comparing trees
def _free_variables(node):
    if node[0] == 'var':
        return {node[1]}
    return set().union(*[_free_variables(c) for c in node[1:] if isinstance(c, tuple)])


def _numerically_close(a, b):
    mp = _mpmath_context()
    if mp.isinf(a) or mp.isinf(b):
        return a == b
    return abs(a - b) <= mp.mpf(RELATIVE_TOLERANCE) * max(abs(a), abs(b)) or abs(a - b) < mp.mpf('1e-50')


def _sample_points(names):
    """SAMPLE_POINTS fixed points in [0.25, 2.25) per variable (one point when there are none)."""
    mp = _mpmath_context()
    rng = random.Random(20240601)  # deterministic, and local to this call
    for _ in range(SAMPLE_POINTS if names else 1):
        yield {v: mp.mpf(rng.random()) * 2 + mp.mpf('0.25') for v in sorted(names)}


def _trees_equal(a, b):
    try:
        return _exact_value(a) == _exact_value(b)
    except _NoExactValue:
        pass
    names = _free_variables(a) | _free_variables(b)
    if len(names) > 10:
        raise _Unparseable()
    return all(_numerically_close(_numeric_value(a, env), _numeric_value(b, env))
               for env in _sample_points(names))


def _proportional(f, g, positive):
    """f = c*g for one constant c != 0 (c > 0 for inequalities) at every sample point."""
    mp = _mpmath_context()
    names = _free_variables(f) | _free_variables(g)
    if not names:
        return False
    ratio = None
    for env in _sample_points(names):
        x, y = _numeric_value(f, env), _numeric_value(g, env)
        if abs(y) < mp.mpf(RELATIVE_TOLERANCE) or abs(x) < mp.mpf(RELATIVE_TOLERANCE):
            return False
        if ratio is None:
            ratio = x / y
        elif not _numerically_close(x / y, ratio):
            return False
    return mp.im(ratio) == 0 and (ratio > 0 or not positive)


# ---------------------------------------------------------------- structure
def _matrix_rows(body):
    rows = [r for r in re.split(r'\\\\|\\(?=[\s\d+\-.(\[])', body.replace('\\hline', '')) if r.strip()]
    return [[cell.strip() for cell in row.split('&')] for row in rows]


def _matrix_factor(s):
    """"c \\begin{pmatrix}.." -> ("c", "\\begin{pmatrix}.."): a scalar factor in front of a matrix, else (None, s)."""
    start = s.find('\\begin{')
    if start <= 0:
        return None, s
    head, body = s[:start].rstrip(), s[start:]
    if head[-1:] in ('(', '['):  # the matrix's own bracket: \frac12 [\begin{array}..]
        head, body = head[:-1].rstrip(), head[-1] + body
    head = re.sub(r'\\(?:cdot|times)$', '', head).strip()
    head = {'-': '-1', '+': '1'}.get(head, head)
    if not head:
        return None, s
    try:
        _parse(head)  # only a scalar is a factor: "A = \begin{pmatrix}.." is an equation
    except _Unparseable:
        return None, s
    return head, body


def _matrix_match(s):
    """(match, factor) of \\begin{pmatrix}..\\end{pmatrix}, also inside ( ) or [ ]
    (\\left[\\begin{array}{cc}..\\end{array}\\right]), maybe after a scalar factor (\\frac12\\begin{pmatrix}..)."""
    factor, s = _matrix_factor(s)
    bracketed = _BRACKETED_MATRIX_RE.match(s)
    if bracketed:
        inner = bracketed.group(1) or bracketed.group(2)
        s = inner if inner.count('\\begin{') == 1 else s
    m = _MATRIX_RE.match(s)
    if factor and m and m.group(1) in ('vmatrix', 'Vmatrix'):
        return None, None  # c|M| is not |cM|: a scaled determinant is no matrix
    return m, factor


def _point_or_interval(sides, relations):
    """"x = 3" -> \\{3\\}, "x < 1" -> (-\\infty,1), else None."""
    if relations == ['='] and re.fullmatch(r'\s*[a-zA-Z]\s*', sides[0]):
        return '\\{%s\\}' % sides[1]
    return _inequality_as_interval(sides, relations) if relations else None


def _inequality_union(s):
    """"x \\le 2 \\lor x > 5" ("or", or \\cup): inequalities in one variable joined -> their intervals
    (a point "x = 3" may join them; equations alone, "x = 2 or x = 3", stay a list of roots)."""
    parts = _split_top_level(s, _UNION_RE.pattern + '|' + _OR_RE.pattern)[0]
    if len(parts) < 2:
        return None
    pieces, names = [], set()
    for part in parts:
        sides, relations = _split_top_level(part, _RELATION_RE.pattern)
        piece = _point_or_interval(sides, relations)
        if piece is None:
            return None
        pieces.append(piece)
        names |= {side.strip() for side in sides if re.fullmatch(r'\s*[a-zA-Z]\s*', side)}
    inequality = any(not piece.startswith('\\{') for piece in pieces)
    return pieces if len(names) == 1 and inequality else None


def _answer_structure(s):
    """(kind, payload): matrix / union / set / bracketed (tuple or interval) / ordered_list / list /
    relation / scalar. Bare comma lists are answer sets (unordered), ';' lists are ordered."""
    m, factor = _matrix_match(s)
    if m:
        rows = _matrix_rows(m.group(2))
        return 'matrix', [['(%s)(%s)' % (factor, cell) for cell in row] for row in rows] if factor else rows
    intervals = _inequality_union(s)
    if intervals:
        return 'union', intervals
    parts, _ = _split_top_level(s, _UNION_RE.pattern)
    if len(parts) > 1:
        return 'union', parts
    if s.startswith('\\{') and s.endswith('\\}') and _closes_at_end(s, 1):
        inner = s[2:-2].strip()
        return 'set', _split_top_level(inner, ',')[0] if inner else []
    if s[:1] in '([' and s[-1:] in ')]' and _closes_at_end(s, 0):
        elements = _split_top_level(s[1:-1], ',')[0]
        if len(elements) > 1:
            return 'bracketed', (s[0] + s[-1], elements)
    for separator, kind in ((';', 'ordered_list'), (',|' + _OR_RE.pattern, 'list')):
        parts = _split_top_level(s, separator)[0]
        if len(parts) > 1:
            return kind, parts
    parts, relations = _split_top_level(s, _RELATION_RE.pattern)
    if len(parts) > 1:
        return 'relation', (parts, relations)
    if s.count('\\pm') + s.count('\\mp') == 1:
        s = s.replace('\\mp', '\\pm')
        return 'list', [s.replace('\\pm', '+'), s.replace('\\pm', '-')]
    return 'scalar', s


def _elements(kind, payload):
    if kind == 'matrix':
        return [cell for row in payload for cell in row]
    return payload[1] if kind == 'bracketed' else payload


def _is_vector(rows):
    return len(rows) == 1 or all(len(r) == 1 for r in rows)


def _resplit_matrix_cells(cells, want):
    """Normalised MATH golds lost '\\\\' before a command ("-\\sqrt{3}/2\\sqrt{3}/2"): re-split."""
    out = []
    for cell in cells:
        out.extend(p for p in re.split(r'(?<=[\w})])(?=\\[a-zA-Z])', cell) if p)
    return out if len(out) == want else cells


# ---------------------------------------------------------------- relations
def _relation_symbol(op):
    op = op.replace('\\', '')
    return _RELATION_SYMBOLS.get(op, op)


def _normalised_relation(parts, ops):
    """a OP b with OP in = < <= (a > b becomes b < a)."""
    a, b, op = parts[0], parts[1], _relation_symbol(ops[0])
    if op.startswith('>'):
        a, b, op = b, a, op.replace('>', '<')
    return a, b, op


def _inequality_as_interval(parts, ops):
    """One-variable inequality ("x < 1", "2 < x <= 5") as an interval string, else None."""
    ops = [_relation_symbol(o) for o in ops]
    if all(o.startswith('>') for o in ops):
        parts, ops = parts[::-1], [o.replace('>', '<') for o in ops[::-1]]
    if not all(o.startswith('<') for o in ops):
        return None
    var = [k for k, p in enumerate(parts) if re.fullmatch(r'\s*[a-zA-Z]\s*', p)]
    if len(parts) == 3 and var == [1]:
        low, high = parts[0], parts[2]
    elif len(parts) == 2 and var == [0]:
        low, high = '-\\infty', parts[1]
    elif len(parts) == 2 and var == [1]:
        low, high = parts[0], '\\infty'
    else:
        return None
    left = '[' if ops[0] == '<=' and var[0] > 0 else '('
    right = ']' if ops[-1] == '<=' and var[0] < len(parts) - 1 else ')'
    return left + low + ',' + high + right


def _relations_equal(relation_a, relation_b):
    if len(relation_a[0]) != 2 or len(relation_b[0]) != 2:
        return _equal_in_order(relation_a[0], relation_b[0]) and relation_a[1] == relation_b[1]
    left_a, right_a, symbol_a = _normalised_relation(*relation_a)
    left_b, right_b, symbol_b = _normalised_relation(*relation_b)
    if symbol_a != symbol_b:
        return False
    if _text_form(left_a) == _text_form(left_b):
        return _answers_equal(right_a, right_b)
    f = ('add', _parse(right_a), ('neg', _parse(left_a)))
    g = ('add', _parse(right_b), ('neg', _parse(left_b)))
    return _proportional(f, g, positive=symbol_a != '=')


def _relation_equals_value(relation, other):
    """"x = 5" vs "5": the right-hand side of an equation; "x < 1" vs "(-\\infty, 1)": the interval."""
    parts, ops = relation
    if all(o == '=' for o in ops):
        return _answers_equal(parts[-1], other)
    interval = _inequality_as_interval(parts, ops)
    return interval is not None and _answers_equal(interval, other)


# ---------------------------------------------------------------- comparing answers
def _equal_in_order(xs, ys):
    return len(xs) == len(ys) and all(_answers_equal(x, y) for x, y in zip(xs, ys))


def _equal_in_any_order(xs, ys):
    if len(xs) != len(ys) or len(xs) > MAX_ELEMENTS:
        return False
    unmatched = list(ys)
    for x in xs:
        hit = next((k for k, y in enumerate(unmatched) if _answers_equal(x, y)), None)
        if hit is None:
            return False
        unmatched.pop(hit)
    return True


def _collections_equal(kind_a, payload_a, kind_b, payload_b):
    """Matrices, sets, lists and tuples against each other."""
    xs, ys = _elements(kind_a, payload_a), _elements(kind_b, payload_b)
    if kind_a == 'matrix' and kind_b == 'matrix':
        if [len(r) for r in payload_a] != [len(r) for r in payload_b]:
            resplit = _resplit_matrix_cells(xs, len(ys)), _resplit_matrix_cells(ys, len(xs))
            if resplit == (xs, ys) and not (_is_vector(payload_a) and _is_vector(payload_b)):
                return False  # a real shape mismatch (1x4 != 2x2), not a gold that lost its "\\\\"
            xs, ys = resplit
        return _equal_in_order(xs, ys)
    if 'matrix' in (kind_a, kind_b):  # a row/column vector equals the tuple of its entries
        matrix = payload_a if kind_a == 'matrix' else payload_b
        return _is_vector(matrix) and _equal_in_order(xs, ys)
    if {kind_a, kind_b} <= {'set', 'list'}:
        return _equal_in_any_order(xs, ys)
    return _equal_in_order(xs, ys)


def _answers_equal(a, b):
    """Structural equivalence of two cleaned answers."""
    _check_deadline()
    a, b = a.strip(), b.strip()
    if not a or not b:
        return False
    if _text_form(a) == _text_form(b):
        return True
    (kind_a, payload_a), (kind_b, payload_b) = _answer_structure(a), _answer_structure(b)
    if kind_a == 'scalar' and kind_b == 'scalar':
        return _scalars_equal(a, b)
    if kind_a == 'relation' and kind_b == 'relation':
        return _relations_equal(payload_a, payload_b)
    if kind_a == 'relation':
        return _relation_equals_value(payload_a, b)
    if kind_b == 'relation':
        return _relation_equals_value(payload_b, a)
    if kind_a == 'union' or kind_b == 'union':
        return kind_a == kind_b and _equal_in_any_order(payload_a, payload_b)
    if kind_a == 'bracketed' and kind_b == 'bracketed':
        return payload_a[0] == payload_b[0] and _equal_in_order(payload_a[1], payload_b[1])
    if 'scalar' in (kind_a, kind_b):
        return False
    return _collections_equal(kind_a, payload_a, kind_b, payload_b)


def _leading_number(s):
    """'125normal{miles}' / '5 apples' -> '125' (a word of >= 3 letters after a number)."""
    m = re.fullmatch(r'([-+]?\d+(?:\.\d+)?)\s*([A-Za-z{}\s]*)', s)
    return m.group(1) if m and re.search(r'[A-Za-z]{3}', m.group(2)) else None


def _based_literal(s):
    """"1011_2", "3_{8}", "A2_{11}" -> (digits, base) when the digits (0-9, A-Z above ten, one 0-9 at least)
    are valid in a base 2-36; else None ("x_1" is a variable)."""
    m = re.fullmatch(r'([0-9A-Z]*\d[0-9A-Z]*)_\{?(\d{1,2})\}?', s.replace(' ', ''))
    if not m or not 2 <= int(m.group(2)) <= 36:
        return None
    try:
        int(m.group(1), int(m.group(2)))  # at most MAX_ANSWER_CHARS digits: cheap
    except ValueError:  # a digit too big for the base: 9_8
        return None
    return m.group(1).lstrip('0') or '0', int(m.group(2))


def _based_equal(based_a, a, based_b, b):
    """A number in a named base: the digits must agree (3 = 3_8, 1011 = 1011_2, 11 != 1011_2), and when
    both sides name a base, the values too (3_{10} = 3_8, 12_{10} != 12_8). 5_{10} = \\frac{10}{2}."""
    if based_a and based_b:
        return based_a[0] == based_b[0] and int(*based_a) == int(*based_b)
    (digits, base), other = (based_a, b.strip()) if based_a else (based_b, a.strip())
    if re.fullmatch(r'[0-9A-Z]+', other):
        return digits == (other.lstrip('0') or '0')
    return base == 10 and _scalars_equal(digits, other)


def _percent_readings(s):
    """p% reads as p and as p/100; without a % sign, only as itself."""
    bare = s.replace('%', '')
    return [bare] + (['(%s)/100' % bare] if '%' in s else [])


def _scalars_equal(a, b):
    choice_a, choice_b = _choice(a), _choice(b)
    if choice_a or choice_b:  # against a choice, "(b)" is the choice B too
        choice_a, choice_b = choice_a or _choice(a, lower_case=True), choice_b or _choice(b, lower_case=True)
        if choice_a and choice_b:
            return choice_a[0] == choice_b[0]
        (_, value), other = (choice_a, b) if choice_a else (choice_b, a)
        return value is not None and _answers_equal(value, other)  # "(C) 17" against 17
    if '%' in a + b:
        return any(_scalars_equal(x, y) for x in _percent_readings(a) for y in _percent_readings(b))
    based_a, based_b = _based_literal(a), _based_literal(b)
    if based_a or based_b:
        return _based_equal(based_a, a, based_b, b)
    number_a, number_b = _leading_number(a), _leading_number(b)
    if number_a or number_b:  # drop the trailing words, then compare again
        return _scalars_equal(number_a or a, number_b or b)
    a, b = (re.sub(r'(?<=\d),(?=\d{3}(?!\d))', '', x) for x in (a, b))  # 29,322,216
    if re.fullmatch(r'[A-Za-z]{2,}', _text_form(a)) or re.fullmatch(r'[A-Za-z]{2,}', _text_form(b)):
        return False  # words and letter codes (LQSX) are text, not products of variables
    try:
        tree_a, tree_b = _parse(a), _parse(b)
    except _Unparseable:
        return False
    return _trees_equal(tree_a, tree_b)


# ---------------------------------------------------------------- the reward
def _gold_variants(gold):
    """Gold '2/3 \\approx 0.67' or '0.56=56' (a number written two ways): accept any part."""
    parts = [p for p in _APPROX_RE.split(gold) if p.strip()]
    out = list(parts)
    for p in parts:
        sides = p.split('=')
        if len(sides) > 1 and not re.search(r'[A-Za-z]', re.sub(r'\\[a-zA-Z]+', '', p)):
            out += sides
    return out or [gold]


def _qualifiers(s):
    """The bound and estimate words of s ("at least 12" -> ['at least']): a qualified value is not the value."""
    return sorted(' '.join(m.lower().split()) for m in _QUALIFIER_RE.findall(s))


def _is_hedge(s):
    """A list of guesses joined by "or"/"and", or a doubt word ("maybe 42"). The official scorer cuts
    "\\text{ or } 43" away as a unit and would reward the hedge; the labels (and we) call it wrong."""
    return bool(_HEDGE_RE.search(re.sub(r'\\[a-zA-Z]+', ' ', s)))


def _compare(answer, gold):
    """(reward, outcome) of the equivalence check alone, under the running deadline."""
    qualifiers = _qualifiers(answer)  # "at least 12" is only "at least 12"; the words then go like units
    cleaned = _clean_answer(_QUALIFIER_RE.sub(' ', answer))
    parts = [p for p in _APPROX_RE.split(cleaned) if p.strip()] if cleaned else []
    if not parts:
        return 0.0, 'wrong'
    # "x \approx 2.45" or "\sqrt{6} \approx 2.45": the exact form or the stated value may match
    readings = [r for p in parts[:2] + parts[-1:] for r in _comma_readings(p)]
    for variant in _gold_variants(gold):
        cleaned_gold = _clean_answer(_QUALIFIER_RE.sub(' ', variant))
        if cleaned_gold and _qualifiers(variant) == qualifiers and any(
                _answers_equal(r, g) for g in _comma_readings(cleaned_gold) for r in readings):
            return 1.0, 'right'
    return 0.0, 'wrong'


def grade(answer, gold, official_equal=False):
    """(reward, outcome) of a boxed answer against the gold; outcome is one of OUTCOMES.

    answer: the content of the response's last \\boxed{} (dsrl.last_boxed), None when there is none.
    gold: the ground-truth string.
    official_equal: the official string scorer's verdict on the whole response
        (dsrl.official_reward(response, gold) == 1.0); what it accepts is right, unless the answer
        hedges and the gold does not. grade(a, b) alone compares two answers.
    Never raises; returns within about TIME_BUDGET_S (cooperative deadline, any thread)."""
    try:
        # The official scorer reads "42 \text{ or } 43" as "42" plus units; a hedge skips that shortcut
        # and is compared as the list it is (right against a gold "42, 43", wrong against "42").
        hedged = answer is not None and (_is_hedge(answer) and not _is_hedge(gold)
                                         or _qualifiers(answer) != _qualifiers(gold))  # "12 \text{ at most}"
        if not _EMPTY_GOLD_RE.sub('', gold):  # no label: nothing matches it, not even the official scorer
            return 0.0, 'no_box' if answer is None else 'wrong'
        if official_equal and not hedged:
            return 1.0, 'right'
        if answer is None:
            return 0.0, 'no_box'
        if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return 0.0, 'unparseable'
        _thread_state.deadline = time.monotonic() + TIME_BUDGET_S
        return _compare(answer, gold)
    except _OutOfTime:
        return 0.0, 'timeout'
    except Exception:  # _Unparseable, or anything else: never let a reward call crash training
        return 0.0, 'unparseable'
    finally:
        _thread_state.deadline = float('inf')


# ---------------------------------------------------------------- command line
_USAGE = "usage: python grader.py RESPONSE GOLD"
_HELP = _USAGE + """

Grade one response against a gold answer as training does, and show the steps: the answer compared (the last
\\boxed{} or \\fbox{} of RESPONSE; a response without one gets outcome no_box and reward 0, as in training),
the gold, the cleaned forms of both (a gold written two ways shows each, separated by ' | '), the verdict and the
outcome (right / wrong / no_box / unparseable / timeout). Exit status 0.

The official string scorer is not applied here (it lives in dsrl.py): training also accepts what
dsrl.official_reward accepts, except hedges such as "42 \\text{ or } 43".
Example:  python grader.py 'so \\boxed{\\frac{2}{4}}' 0.5"""


def _cleaned_for_display(text):
    """_clean_answer for the command line, which shows a failure instead of raising it."""
    try:
        cleaned = _clean_answer(text)
    except Exception as error:  # _Unparseable, or a number too long for int()
        return '(cannot be cleaned: %s)' % (type(error).__name__.lstrip('_'),)
    return '(empty or doubtful)' if cleaned is None else cleaned


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0] in ('-h', '--help'):
        print(_HELP)
        return 0
    if len(argv) != 2:
        print("%s  (expected 2 arguments, got %d; --help explains)" % (_USAGE, len(argv)), file=sys.stderr)
        return 2
    response, gold = argv
    answer = last_box(response)  # what training reads: the last box only
    reward, outcome = grade(answer, gold)
    cleaned_gold = ' | '.join(_cleaned_for_display(v) for v in _gold_variants(gold))
    why = ('the last box is cut off or empty, so training scores it 0' if _BOX_RE.search(response) else
           'no \\boxed{} in the response, so training scores it 0; to grade a bare answer, box it: '
           "'\\boxed{%s}'" % (response if len(response) <= 40 else '...'))
    print('answer: %s' % ('(none: %s)' % why if answer is None else answer))
    print('gold: %s' % gold)
    print('cleaned answer: %s' % ('(none)' if answer is None else _cleaned_for_display(answer)))
    print('cleaned gold: %s' % cleaned_gold)
    print('verdict: %s' % ('equal' if reward == 1.0 else 'not equal'))
    print('outcome: %s' % outcome)
    return 0


if __name__ == '__main__':
    sys.exit(main())
