"""TextGen on Ray RLlib: the same ``TextGen-v0``, LM policy and RLHF objective, trained by RLlib's PPO (new API stack:
RLModule, Learner, EnvRunner, ConnectorV2) across processes and machines.

Ray is an optional extra (``pip install 'textgen-rl[rllib]'``); importing this package without it says so.

Example:
    >>> from agents.rllib import train_rllib
    >>> from agents.run import TrainConfig
    >>> report = train_rllib(TrainConfig(total_timesteps=1024), num_env_runners=2)
"""

from __future__ import annotations

try:
    import ray  # noqa: F401
    from ray import rllib  # noqa: F401
except ImportError as err:  # tests/test_rllib.py::test_missing_ray_says_how_to_install
    raise ImportError(
        f"the RLlib engine needs Ray RLlib ({err}): pip install 'textgen-rl[rllib]' (ray[rllib]==2.60.*)"
    ) from err

from agents.rllib.learner import EpisodeRewardScaling, KLRewardPenalty, RLHFPPOLearner
from agents.rllib.module import REF_LOGP, CausalLMRLModule
from agents.rllib.train import RLHFMetrics, connect_ray, export_rllib, load_rllib_module, rllib_config, train_rllib

__all__ = [
    "REF_LOGP",
    "CausalLMRLModule",
    "EpisodeRewardScaling",
    "KLRewardPenalty",
    "RLHFMetrics",
    "RLHFPPOLearner",
    "connect_ray",
    "export_rllib",
    "load_rllib_module",
    "rllib_config",
    "train_rllib",
]
