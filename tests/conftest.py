"""Shared fixtures: a tiny random LM built once per session and loaded through the real loading code."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from text_env.models import make_tiny_model

TINY_PROMPTS = ["the movie was", "i loved the film and", "a sad , dull", "great acting and"]


class LengthReward:
    """A trivially learnable reward: the fraction of completion characters that are the letter 'a'."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([c.count("a") / max(1, len(c)) for c in completions], dtype=np.float64)


class ReferenceLength:
    """A scorer that takes keyword columns: the length of each example's first reference, plus its ``meta["bonus"]``
    (-1 without references), so a test sees exactly which record reached it."""

    name = "reference length"

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], references: Sequence[list[str] | None] | None = None,
        bonus: Sequence[float | None] | None = None,
    ) -> np.ndarray:  # fmt: skip
        refs = references or [None] * len(prompts)
        extra = bonus or [None] * len(prompts)
        return np.array([len(r[0]) + (b or 0) if r else -1.0 for r, b in zip(refs, extra, strict=True)], dtype=float)


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (``CI`` set, as .ci/run's runner does) a skipped test fails the run: ``.[dev]`` installs everything
    the suite uses, so a skip there means a missing dependency, not an optional one."""
    if _SKIPPED and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(f"CI: {len(_SKIPPED)} skipped test(s), which CI does not allow: {', '.join(_SKIPPED)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny models are faster on one thread, and CI's two cores are shared with the test process itself."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a 2-layer random Llama with a 128-token BPE tokenizer (no chat template)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LM with a simple chat template, to exercise prompt rendering."""
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}<s>assistant:"
    return make_tiny_model(tmp_path_factory.mktemp("tiny-chat-lm"), chat_template=template)


@pytest.fixture
def tiny_env_kwargs(tiny_model: Path) -> dict:
    """Keyword arguments for a fast TextGen env on the tiny model with the gold (VADER) reward."""
    return dict(
        model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_new_tokens=6, max_prompt_tokens=24
    )
