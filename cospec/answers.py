"""Reading answers out of completions: the final number of a math solution and the code of a
programming one.

Math: the answer is the last closed ``\\boxed{...}``; without one, the last stated answer
("The answer is 18.", "Answer: 18", "#### 18"; of "The answer is 20 - 2 = 18.", the result);
without that, the last number in the text.
Numbers are compared exactly (as fractions), so "18.00", "$18", "18 eggs", "1{,}000",
"2\\frac{1}{2}" and "−3" (a unicode minus) read as the numbers they write; an answer that is
not a number (MATH-500 has many) is compared as normalized LaTeX.

Code: the fenced block that defines the function the tests call, so prose, usage examples
and test runs in other blocks cannot replace the solution.
"""

from __future__ import annotations

import ast
import builtins
import re
from fractions import Fraction

# ---------------------------------------------------------------- math

MINUS = "\u2212\ufe63\uff0d"  # −, small and full-width hyphen-minus: all read as "-"
_SIGN = rf"(?:(?<![\w)}}\]])[-{MINUS}])?"                      # not a hyphen after a word
_SEP = r"(?:,|\{,\}|\\,|[\u2009\u202f\u00a0])"                # thousands separators in prose
_INT = rf"(?:\d{{1,3}}(?:{_SEP}\d{{3}})+(?!\d|,\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_ARG = r"(?:\{\s*-?\d+(?:\.\d+)?\s*\}|\d)"                    # {12}, {-1.5} or one digit
_FRAC = rf"\\[dt]?frac\s*{_ARG}\s*{_ARG}"
NUMBER = re.compile(rf"{_SIGN}(?:(?:\d+\s*)?{_FRAC}|{_DEC}(?:\s*/\s*{_DEC})?)")
"""A number as written in prose: signed, with thousands separators, a decimal part, an
exponent, a fraction ``a/b`` or ``\\frac{a}{b}``, or a mixed number ``2\\frac{1}{2}``."""

# The whole of a cleaned, unsigned answer string (to_number): thousands separated by "," or " ".
_PLAIN = (r"(?:(?:\d{1,3}(?:(?P<sep>[, ])\d{3})(?:(?P=sep)\d{3})*|\d+)(?:\.\d+)?|\.\d+)"
          r"(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"(\d+)?\s*\\[dt]?frac\s*(?:\{\s*(-?[\d.]+)\s*\}|(\d))"
                       r"\s*(?:\{\s*(-?[\d.]+)\s*\}|(\d))")
_MIXED = re.compile(r"(\d+)\s+(\d+)\s*/\s*(\d+)")
_RATIO = re.compile(rf"(?P<num>{_PLAIN})(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?")
_WRAPPERS = re.compile(r"\\(?:text(?:bf|rm|normal)?|mbox|mathrm)\s*\{([^{}]*)\}")
_SPACES = re.compile(r"\\[,;: ]|~|[\u2009\u202f\u00a0]")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_STATED = re.compile(r"(?:\banswer[\s*_]*(?:(?:is|was|will be|would be)\b|=|:)|####)", re.I)
_STATED_NUMBER = re.compile(rf"[\s$*_:\\(\[{{]*({NUMBER.pattern})")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_OPERATION = re.compile(r"\d\s*(?:[-+*/\u00d7\u00f7x]|\\times|\\cdot|\\div)\s*[$(]?\s*\.?\d")


def last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed),
    or None. An unclosed one (a completion cut short) and an empty one (a template's
    ``\\boxed{}``) are passed over."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth = 0
        for j in range(m.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                if text[m.end():j].strip():
                    return text[m.end():j]
                break
    return None


def _clean(answer: str) -> str:
    """Signs unified, text wrappers opened, money/percent/degree marks and LaTeX spaces
    dropped, whitespace collapsed: what is left of a plain number is digits and punctuation."""
    s = answer.translate({ord(c): "-" for c in MINUS})
    s = _WRAPPERS.sub(r" \1 ", s)
    s = _DEGREES.sub("", s).replace("{,}", ",")
    s = _SPACES.sub(" ", s)
    for mark in ("\\!", "\\$", "$", "\\%", "%", "\\displaystyle"):
        s = s.replace(mark, "")
    return " ".join(s.split())


def _strip_words(s: str) -> str:
    """``s`` without a leading label ("x =", "Total:", "She makes") and trailing unit words
    ("eggs", "dollars per day"): words of two or more letters, or a letter before "=" / ":".
    Nothing is stripped from an expression (``x^2``, ``2x+1``, ``\\sqrt{2}``)."""
    s = re.sub(r"^(?:[A-Za-z][A-Za-z'\s]*?\s*[=:]|(?:[A-Za-z]{2,}[\s,']+)+)\s*(?=[-.\d\\])",
               "", s)
    return re.sub(r"(?<=[\d}.])\s+[A-Za-z]{2,}[A-Za-z'/\s.,-]*$", "", s)


def to_number(text: str) -> Fraction | None:
    """The exact value of an answer string that is one number, else None.

    Reads '$1,234.', '18.00', '18 \\text{eggs}', '\\frac{1}{2}', '\\frac34', '2\\frac{1}{2}',
    '3/4', '50\\%', '−3', '1\\,000', '1{,}000', '1 000', '1.5e3', 'x = 5'. Commas and spaces
    count as thousands separators only between groups of exactly three digits ('1,8' is no
    number). An expression (``2\\sqrt{2}``, ``x^2``) is None.
    """
    s = _strip_words(_clean(text)).rstrip(". ")
    neg = s.startswith("-")
    s = s[1:].lstrip() if neg else s
    try:
        if m := _FRACTION.fullmatch(s):
            value = int(m[1] or 0) + Fraction(m[2] or m[3]) / Fraction(m[4] or m[5])
        elif m := _MIXED.fullmatch(s):
            value = int(m[1]) + Fraction(int(m[2]), int(m[3]))
        elif m := _RATIO.fullmatch(s):
            value = Fraction(re.sub("[, ]", "", m["num"])) / Fraction(m["den"] or 1)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return -value if neg else value


def final_answer(text: str) -> str | None:
    """The answer a completion gives: the last closed ``\\boxed{}``; else the number after
    the last "answer is" / "Answer:" / "####" (numbers later in the text, such as in "I hope
    this helps with problem 2.", do not replace it); else the last number; else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for m in reversed(list(_STATED.finditer(text))):
        found = _STATED_NUMBER.match(text, m.end())
        if found is not None:
            return _result(text, found)
    found = NUMBER.findall(text)
    return found[-1] if found else None


def _result(text: str, found: re.Match) -> str:
    """The stated answer ``found`` (a match of _STATED_NUMBER), or, where its sentence goes
    on as a calculation ("The answer is 20 - 5 = 15."), the number after the sentence's last
    "=" (not after "18 = 2 x 9": no operation before that "=")."""
    end = _SENTENCE_END.search(text, found.end())
    sentence = text[found.start(1):end.start() if end else len(text)]
    eq = sentence.rfind("=")
    if eq > 0 and _OPERATION.search(sentence, 0, eq):
        after = _STATED_NUMBER.match(sentence, eq + 1)
        if after is not None:
            return after[1]
    return found[1]


def normalize(answer: str) -> str:
    """A non-numeric answer in one spelling: text wrappers opened, sizing and spacing
    commands, ``$`` and degree marks dropped, ``\\dfrac``/``\\tfrac`` -> ``\\frac``,
    ``\\frac34`` -> ``\\frac{3}{4}``, ``\\sqrt2`` -> ``\\sqrt{2}``, a leading one-letter
    ``x =`` dropped, no spaces, no final period."""
    s = _clean(answer)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[A-Za-z]\s*=(?!=)", "", s)
    return s.replace(" ", "").rstrip(".")


def math_correct(completion: str, gold: str) -> bool:
    """Whether the completion's final answer equals ``gold``: exactly as numbers when both
    read as one, else as normalized strings."""
    got = final_answer(completion)
    if got is None:
        return False
    a, b = to_number(got), to_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize(got) == normalize(gold) != ""


# ---------------------------------------------------------------- code

FENCE = re.compile(r"^[ \t]*```+[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
"""A fenced block: its language tag (may be empty) and its body; the closing fence starts a
line; an unclosed last fence runs to the end of the text."""
PYTHON_TAGS = {"", "python", "python3", "py", "py3"}


def _defines(code: str, name: str = r"\w+") -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{name}[ \t]*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str = "") -> str:
    """The code of a completion: among its fenced Python blocks (tag python, python3, py,
    any case, or none), the last that defines ``entry_point``; else the last that defines
    any function; else the last block; else the raw text (a bare function body)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [(tag.lower(), body) for tag, body in FENCE.findall(text)]
    python = [body for tag, body in blocks if tag in PYTHON_TAGS] or [b for _, b in blocks]
    if not python:
        return text
    if entry_point:
        named = [b for b in python if _defines(b, re.escape(entry_point))]
        if named:
            return named[-1]
    defining = [b for b in python if _defines(b)]
    return (defining or python)[-1]


def function_under_test(tests: str) -> str:
    """The function the test code calls: the first call in an ``assert`` to a name that is
    not a builtin, else the first to one that is (mbpp/126 asks for a function ``sum``;
    '' if the asserts call no name, or if the tests do not parse)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return ""
    called = [call.func.id for node in ast.walk(tree) if isinstance(node, ast.Assert)
              for call in ast.walk(node.test)
              if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)]
    return next((n for n in called if not hasattr(builtins, n)), called[0] if called else "")
