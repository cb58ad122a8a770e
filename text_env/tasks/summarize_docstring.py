"""summarize-docstring: write a stdlib docstring's summary line from its description (read from this Python).

PEP 257 docstrings are "a summary line, followed by a more elaborate description": real prose, written by the
CPython developers, that ships with every Python. The description is the input, the summary line the reference,
and the gold scorer is ROUGE-L F1 (:class:`~text_env.rewards.gold.RougeL`). The set is read from the installed
standard library's source with :mod:`ast` (nothing is imported or executed), in a fixed order, so it is the same for
a given Python minor version; train and eval are split by top-level module, so that no module (nor a package's
near-duplicate submodule docstrings) is on both sides. No learned reward model ships for it yet.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from text_env.prompts import Example
from text_env.tasks import Task, shipped_reward_model

__all__ = ["docstring_examples", "make_task", "split_docstring"]

_SKIPPED_MODULES = frozenset({"test", "idlelib", "lib2to3", "turtledemo", "antigravity", "this", "__hello__"})


def split_docstring(doc: str) -> tuple[str, str] | None:
    """``(summary line, description)`` of a cleaned docstring, or ``None`` when it has no one-line summary followed
    by a blank line and a description (PEP 257's shape)."""
    head, sep, body = doc.strip().partition("\n\n")
    if not sep or "\n" in head.strip():
        return None
    return head.strip(), body.strip()


def _is_prose(summary: str, body: str, min_words: int, max_words: int) -> bool:
    """A summary sentence of 3 to 20 words and a description of plain prose paragraphs (no doctests, code, tables,
    argument lists or directives) of ``min_words`` to ``max_words`` words."""
    n_summary, n_body = len(summary.split()), len(body.split())
    if not 3 <= n_summary <= 20 or not summary[0].isupper() or not summary.endswith("."):
        return False
    if not min_words <= n_body <= max_words:
        return False
    lines = body.split("\n")
    markup = (">>>", "..", "::", "--", "==", ":param", ":return", "*", "-", "+", "|", "Args:", "Returns:", "Example")
    if any(line.startswith((" ", "\t")) or line.lstrip().startswith(markup) for line in lines):
        return False  # indented blocks are code or argument lists; the rest is reST markup
    return "::" not in body and summary.lower() not in body.lower()  # the summary must not be copyable


def _module_files(stdlib: Path) -> Iterator[tuple[str, str, Path]]:
    """``(top-level module, dotted module, file)`` of the public pure-Python standard library, in sorted order."""
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in _SKIPPED_MODULES:
            continue
        if (stdlib / f"{top}.py").is_file():
            yield top, top, stdlib / f"{top}.py"
        elif (stdlib / top / "__init__.py").is_file():
            for path in sorted((stdlib / top).rglob("*.py")):
                parts = path.relative_to(stdlib).with_suffix("").parts
                if any((p.startswith("_") and p != "__init__") or p in ("test", "tests") for p in parts):
                    continue
                yield top, ".".join(p for p in parts if p != "__init__"), path


def _public_definitions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """``(qualified name, node)`` of the public functions and classes in ``body`` and, recursively, in its classes."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from _public_definitions(node.body, f"{prefix}{node.name}.")


def docstring_examples(min_words: int = 25, max_words: int = 110) -> list[Example]:
    """Every prose docstring of the installed standard library's public functions, classes and methods, as records:
    prompt = the description with the object's dotted name, reference = the summary line, ``meta`` = ``module``
    (dotted), ``top_module`` and ``name``.

    :param min_words: shortest description kept (shorter ones leave little to summarise).
    :param max_words: longest description kept (so that prompts fit the task's ``max_prompt_tokens``).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    examples = []
    for top, module, path in _module_files(stdlib):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are deliberately broken or not UTF-8
            continue
        for qualname, node in _public_definitions(tree.body):
            doc = ast.get_docstring(node)
            parts = split_docstring(doc) if doc else None
            if parts is None or not _is_prose(*parts, min_words, max_words):
                continue
            summary, body = parts
            name = f"{module}.{qualname}"
            prompt = f"Write the one-line summary of this docstring of Python's `{name}`:\n\n{' '.join(body.split())}"
            examples.append(Example(prompt, (summary,), {"module": module, "top_module": top, "name": name}))
    return list({e.prompt: e for e in examples}.values())  # the same text twice (overloads, copies) counts once


def _in_eval(top_module: str, eval_fraction: float) -> bool:
    """A fixed, seed-free assignment of a top-level module to the eval split (CRC32 is stable across runs)."""
    return zlib.crc32(top_module.encode()) % 1000 < eval_fraction * 1000


def make_task(eval_fraction: float = 0.25) -> Task:
    """The summarize-docstring task: standard-library docstrings, split by top-level module, gold ROUGE-L F1."""
    from text_env.rewards.gold import RougeL

    examples = docstring_examples()
    train = [e for e in examples if not _in_eval(e.meta["top_module"], eval_fraction)]
    held_out = [e for e in examples if _in_eval(e.meta["top_module"], eval_fraction)]
    return Task(
        name="summarize-docstring",
        reward_model=shipped_reward_model("summarize-docstring"),
        description=__doc__.strip().splitlines()[0],  # the module docstring's summary line
        recommended="SFT + PPO (seed 0: 0.324 against SFT 0.248, PPO 0.165, base 0.099; seed 0 of 3 so far)",
        train_prompts=train,
        eval_prompts=held_out,
        make_gold=RougeL,
        instruction=None,  # the description is the user turn; the model answers with the summary
        max_new_tokens=32,
        max_prompt_tokens=320,
        stop_strings=("\n",),  # a summary is one line
    )
