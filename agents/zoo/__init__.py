"""rl-zoo3 hyperparameters for TextGen-v0, one Python module per algorithm, and a launcher that adds MaskablePPO.

rl-zoo3 reads a Python config module with ``-conf``; these need classes (the LM policy, the episode buffer),
which its YAML files cannot name::

    ZOO="--env TextGen-v0 --gym-packages text_env"
    python -m rl_zoo3.train --algo ppo $ZOO -conf agents.zoo.ppo          # also: a2c, trpo, ppo_lstm
    python -m agents.zoo train --algo maskable_ppo $ZOO -conf agents.zoo.maskable_ppo
    python -m rl_zoo3.enjoy --algo ppo $ZOO -f logs/ --no-render          # agents.zoo enjoy for maskable_ppo

Every config leashes the policy to its reference LM with :class:`agents.kl.KLPenalty` (β = 0.05) and logs
reward-model and gold scores with :class:`agents.callbacks.TextMetrics`. Override anything with rl-zoo3's
``--env-kwargs`` / ``-params`` (e.g. ``-params policy_kwargs:"dict(model='my/lm')"`` with
``--env-kwargs model:"'my/lm'"``: the policy's LM and the env's must be the same).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CALLBACKS", "register"]

# rl-zoo3 builds callbacks from names: the KL leash of every algorithm, and text metrics.
CALLBACKS: list[Any] = [{"agents.kl.KLPenalty": {"beta": 0.05}}, "agents.callbacks.TextMetrics"]


def register() -> None:
    """Add sb3-contrib's ``MaskablePPO`` to rl-zoo3's algorithms as ``maskable_ppo`` (rl-zoo3 lacks it)."""
    from rl_zoo3 import ALGOS
    from sb3_contrib import MaskablePPO

    ALGOS.setdefault("maskable_ppo", MaskablePPO)
