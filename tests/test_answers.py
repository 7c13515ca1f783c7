"""Answer reading on hand-written completions: final numbers, normalized LaTeX, code blocks."""

from fractions import Fraction

import pytest

from cospec.answers import (
    extract_code,
    final_answer,
    function_under_test,
    math_correct,
    normalize,
    to_number,
)
from cospec.tasks import get_task


@pytest.mark.parametrize("text, gold, ok", [
    ("so the answer is \\boxed{18}", "18", True),
    ("The answer is $1,234.", "1234", True),
    ("She pays 18.00 dollars", "18", True),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{18 \\text{ eggs}}", "18", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("first 12, then \\boxed{17}", "18", False),
    ("I cannot solve this.", "18", False),
    ("\\boxed{", "18", False),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{-3}", "-3", True),
    # a unicode minus is a minus
    ("\\boxed{\u22123}", "-3", True),
    ("\\boxed{\u22123}", "3", False),
    ("The temperature drops to \u22125 degrees.", "-5", True),
    # text inside the box
    ("\\boxed{\\text{18}}", "18", True),
    ("\\boxed{\\text{18 dollars}}", "18", True),
    ("\\boxed{\\$18 \\text{ per day}}", "18", True),
    # thousands separators
    ("\\boxed{1\\,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{1 000}", "1000", True),
    ("\\boxed{1,234,567}", "1234567", True),
    ("\\boxed{1,8}", "18", False),
    ("\\boxed{12,34}", "1234", False),
    # mixed numbers, bare \frac arguments, exponents
    ("\\boxed{2\\frac{1}{2}}", "2.5", True),
    ("\\boxed{-2\\frac{1}{2}}", "-2.5", True),
    ("\\boxed{\\frac34}", "0.75", True),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("\\boxed{1.5e3}", "1500", True),
    # a stated answer wins over unrelated numbers after it
    ("The answer is 18. I hope this helps with problem 2.", "18", True),
    ("Answer: **18**\n\nNext time try 3 cups.", "18", True),
    ("#### 1,000\nThat was question 7.", "1000", True),
])
def test_math_grader(text, gold, ok):
    assert math_correct(text, gold) is ok


@pytest.mark.parametrize("text, value", [
    ("$1,234.", Fraction(1234)),
    ("\u22123", Fraction(-3)),
    ("\\text{18}", Fraction(18)),
    ("Janet makes \\$18 every day", Fraction(18)),
    ("x = 5", Fraction(5)),
    ("1\\,000", Fraction(1000)),
    ("1{,}000", Fraction(1000)),
    ("1 000", Fraction(1000)),
    ("12,000.50", Fraction(24001, 2)),
    ("2\\frac{1}{2}", Fraction(5, 2)),
    ("2 1/2", Fraction(5, 2)),
    ("\\frac34", Fraction(3, 4)),
    ("\\dfrac{-1}{4}", Fraction(-1, 4)),
    ("1.5e3", Fraction(1500)),
    ("30^\\circ", Fraction(30)),
    ("1,8", None),
    ("1,2345", None),
    ("x^2", None),
    ("\\sqrt{2}", None),
    ("2\\sqrt{2}", None),
    ("2 x", None),
    ("(1, 2)", None),
    ("2 \\text{ and } 3", None),
])
def test_to_number(text, value):
    assert to_number(text) == value


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{17} then \\boxed{18}", "18"),
    ("\\boxed{18} and a cut \\boxed{1", "18"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("The answer is 18. I hope this helps with problem 2.", "18"),
    ("The answer is $-\\frac{3}{4}$. Check 5.", "-\\frac{3}{4}"),
    ("The final answer is: \u22127 (see step 3)", "\u22127"),
    ("To find the answer: Janet has 3 eggs, sells 2, keeps 1", "1"),  # no stated number
    ("pages 10-15", "15"),
    ("no number here", None),
    ("So the answer is 20 - 5 = 15.", "15"),             # a calculation: its result
    ("The answer is 100 / 4 = $25. Then 7", "25"),
    ("The answer is 18 = 2 x 9.", "18"),                 # no operation before the "="
    ("The answer is 3.5. Check 4", "3.5"),
    ("\\boxed{18} eggs. (Template: \\boxed{})", "18"),   # an empty box is no answer
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize("text, gold, ok", [
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\frac{\\sqrt3}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{x = 2y + 1}", "2y+1", True),
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{x^2}", "2", False),
    ("\\boxed{\\sqrt{2}}", "2", False),
    ("\\boxed{2\\sqrt{2}}", "2", False),
    ("\\boxed{}", "", False),
])
def test_math500_answers(text, gold, ok):
    assert math_correct(text, gold) is ok


def test_normalize_spellings():
    assert normalize("\\dfrac34") == normalize("\\frac{3}{4}") == "\\frac{3}{4}"
    assert normalize("$x = \\sqrt2$.") == "\\sqrt{2}"
    assert normalize("\\text{Evelyn}") == "Evelyn"


SOLUTION = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("text", [
    f"```python\n{SOLUTION}```\n\nUsage:\n```python\nprint(add(1, 2))\n```\n",
    f"```python\n{SOLUTION}```\nTests:\n```python\nassert add(1, 2) == 3\n```",
    f"```python3\n{SOLUTION}```",
    f"```py\n{SOLUTION}```",
    f"```Python\n{SOLUTION}```",
    f"```\n{SOLUTION}```",
    f"```python\r\n{SOLUTION.replace(chr(10), chr(13) + chr(10))}```\r\n",
    f"Here it is:\n```python\n{SOLUTION}",  # cut before the closing fence
    f"```python\ndef helper():\n    pass\n```\n```python\n{SOLUTION}```\n"
    "```python\ndef test_add():\n    assert add(1, 2) == 3\n```",
    f"```bash\npip install nothing\n```\n```python\n{SOLUTION}```\n```text\n3\n```",
])
def test_extract_code_picks_the_block_that_defines_the_entry_point(text):
    assert extract_code(text, "add") == SOLUTION


def test_extract_code_fallbacks():
    helper = "def helper():\n    return 1\n"
    assert extract_code(f"```python\n{helper}```\n```python\nprint(helper())\n```",
                        "add") == helper
    assert extract_code("```python\nx = 1\n```\n```python\ny = 2\n```") == "y = 2\n"
    body = "    return a + b\n"
    assert extract_code(body, "add") == body


@pytest.mark.parametrize("tag", ["python3", "py", "Python", ""])
def test_extract_code_prefers_python_blocks(tag):
    assert extract_code(f"```{tag}\nprint(1)\n```\n```output\n1\n```") == "print(1)\n"


def test_function_under_test_skips_builtins():
    assert function_under_test("assert remove_Occ('hello', 'l') == 'heo'\n") == "remove_Occ"
    assert function_under_test("assert set(similar([1, 2], [2])) == set([2])\n") == "similar"
    assert function_under_test("assert math.isclose(area(2), 12.56, rel_tol=0.01)\n") == "area"
    assert function_under_test("assert is_Diff (12345) == False\n") == "is_Diff"
    assert function_under_test("assert (\n") == ""
    assert function_under_test("assert sum(10, 15) == 6\n") == "sum"  # mbpp/126: a builtin's name
    assert function_under_test("assert len(pairs(3)) == 2\n") == "pairs"


def test_mbpp_grade_finds_a_function_named_as_a_builtin():
    """mbpp/126 asks for ``sum``: the block defining it is graded, not a later helper's."""
    task = get_task("mbpp")
    p = next(p for p in task.problems() if p.id == "mbpp/126")
    sol = ("def sum(a, b):\n    s = 0\n    for i in range(1, min(a, b) + 1):\n"
           "        if a % i == 0 and b % i == 0:\n            s += i\n    return s\n")
    helper = "\nTo check it:\n```python\ndef test():\n    print(sum(10, 15))\ntest()\n```"
    assert task.grade(p, f"```python\n{sol}```" + helper)


def test_mbpp_grade_ignores_a_usage_example_after_the_solution():
    task = get_task("mbpp")
    p = task.problems("test")[0]
    good = ("```python\ndef remove_Occ(s, ch):\n    i = s.find(ch)\n    if i >= 0:\n"
            "        s = s[:i] + s[i + 1:]\n    j = s.rfind(ch)\n    if j >= 0:\n"
            "        s = s[:j] + s[j + 1:]\n    return s\n```")
    usage = "\n\nFor example:\n```python\nprint(remove_Occ('hello', 'l'))\n```\n"
    assert task.grade(p, good + usage)
