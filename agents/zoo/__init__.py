"""rl-zoo3 hyperparameters for TextGen-v0, one Python module per algorithm, and a launcher that adds MaskablePPO.

rl-zoo3 reads a Python config module with ``-conf``; these need classes (the LM policy, the episode buffer),
which its YAML files cannot name::

    ZOO="--env TextGen-v0 --gym-packages text_env"
    python -m rl_zoo3.train --algo ppo $ZOO -conf agents.zoo.ppo          # also: a2c, trpo, ppo_lstm
    python -m agents.zoo train --algo maskable_ppo $ZOO -conf agents.zoo.maskable_ppo
    python -m rl_zoo3.enjoy --algo ppo $ZOO -f logs/ --no-render          # agents.zoo enjoy for maskable_ppo

Every config is ``textgen train``'s settings for that algorithm (:func:`hyperparams`, from
:class:`agents.run.TrainConfig` and its presets), leashes the policy to its reference LM with
:class:`agents.kl.KLPenalty` and logs reward-model and gold scores with :class:`agents.callbacks.TextMetrics`.
Override anything with rl-zoo3's ``--env-kwargs`` / ``-params``; ``--env-kwargs model:"'my/lm'"`` alone changes
the LM, as the policy takes the env's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["hyperparams", "register"]


def hyperparams(algo: str) -> dict[str, Any]:
    """rl-zoo3's ``hyperparams`` for ``TextGen-v0`` with ``algo``: ``textgen train``'s settings
    (:func:`agents.run.algorithm_kwargs` of ``TrainConfig.for_algo(algo)``), the KL leash and text metrics."""
    from agents.run import TrainConfig, algorithm_kwargs

    config = TrainConfig.for_algo(algo)
    kwargs = algorithm_kwargs(config)
    if isinstance(kwargs["policy"], type):  # rl-zoo3 imports dotted names
        kwargs["policy"] = f"{kwargs['policy'].__module__}.{kwargs['policy'].__qualname__}"
    kwargs["policy_kwargs"].pop("model", None)  # the LM policy takes the env's (--env-kwargs model:...)
    kwargs.update(
        n_envs=config.n_envs, n_timesteps=config.total_timesteps,
        callback=[{"agents.kl.KLPenalty": {"beta": config.beta, "target_kl": config.target_kl}},
                  "agents.callbacks.TextMetrics"],
    )  # fmt: skip
    if algo == "maskable_ppo":  # the env LM's top-p masks, through a VecEnv wrapper that gives action_masks()
        kwargs["vec_env_wrapper"] = [{"agents.masks.TopPMask": {"top_p": config.mask_top_p}}]
    return {"TextGen-v0": kwargs}


def register() -> None:
    """Add sb3-contrib's ``MaskablePPO`` to rl-zoo3's algorithms as ``maskable_ppo`` (rl-zoo3 lacks it)."""
    from rl_zoo3 import ALGOS
    from sb3_contrib import MaskablePPO

    ALGOS.setdefault("maskable_ppo", MaskablePPO)
