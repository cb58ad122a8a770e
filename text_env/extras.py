"""The optional extras: which extra provides which import, and the one check that a feature's extra is installed.

The base install (``pip install -e .``) runs every default of every command. What only some options use stays
optional, is listed here once, and is checked at the door of the command or option that needs it, before any
download, model load or run directory, with one message that names the extra to install (as SB3 does for its own
extras, and transformers with ``requires_backends``).

Example:
    >>> from text_env.extras import require
    >>> require("label", "textgen label")  # raises MissingExtra without fastapi and uvicorn
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtra", "is_available", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "label": ("fastapi", "uvicorn"),  # the pages of textgen label, textgen inspect and textgen evaluate --human
    "rllib": ("ray",),  # textgen train --engine rllib, agents.rllib
    "trl": ("trl",),  # the external baselines of benchmarks/ (GRPO, RLOO, DPO)
    "tensorboard": ("tensorboard",),  # textgen train --tensorboard
    "datasets": ("datasets",),  # hf:NAME prompts and preference pairs
    "zoo": ("rl_zoo3",),  # python -m agents.zoo (rl-zoo3's train and enjoy)
}
"""Each extra of ``pyproject.toml`` that a feature of the package needs, and the top-level modules it provides."""


class MissingExtra(ImportError):
    """A feature's optional extra is not installed; the message is the one line that says how to install it."""


def is_available(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported (found, not imported: cheap)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    return all(importlib.util.find_spec(module) is not None for module in EXTRAS[extra])


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` unless ``extra`` is installed.

    :param extra: a key of :data:`EXTRAS`.
    :param feature: what needs it, as the user asked for it (``"textgen label"``, ``"--engine rllib"``).
    """
    if not is_available(extra):
        raise MissingExtra(f'{feature} needs the {extra!r} extra: pip install -e ".[{extra}]"')
