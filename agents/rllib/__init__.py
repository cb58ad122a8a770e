"""TextGen on Ray RLlib: the same ``TextGen-v0``, LM policy and RLHF objective, trained by RLlib's PPO (new API stack:
RLModule, Learner, EnvRunner, ConnectorV2) across processes and machines.

Ray is an optional extra (the ``rllib`` extra of :data:`text_env.extras.EXTRAS`); importing this package without it
says so.

Example:
    >>> from agents.rllib import train_rllib
    >>> from agents.run import TrainConfig
    >>> report = train_rllib(TrainConfig(total_timesteps=1024), num_env_runners=2)
"""

from __future__ import annotations

from text_env.extras import require

require("rllib", "the RLlib engine")  # tests/test_rllib.py::test_missing_ray_says_how_to_install

from agents.rllib.learner import KLRewardPenalty, RLHFPPOLearner  # noqa: E402
from agents.rllib.module import REF_LOGP, CausalLMRLModule  # noqa: E402
from agents.rllib.train import (  # noqa: E402
    RLHFMetrics,
    connect_ray,
    export_rllib,
    load_rllib_module,
    make_rllib_env,
    rllib_config,
    train_rllib,
)

__all__ = [
    "REF_LOGP",
    "CausalLMRLModule",
    "KLRewardPenalty",
    "RLHFMetrics",
    "RLHFPPOLearner",
    "connect_ray",
    "export_rllib",
    "load_rllib_module",
    "make_rllib_env",
    "rllib_config",
    "train_rllib",
]
