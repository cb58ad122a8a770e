"""The RLHF objective in RLlib: reward − β·KL(π‖π_ref) per token, applied in the Learner before GAE.

:class:`KLRewardPenalty` is a learner ConnectorV2 piece that :class:`RLHFPPOLearner` inserts right before RLlib's
``GeneralAdvantageEstimation``, so advantages and value targets see the penalised rewards, exactly as SB3 stores
them after :class:`agents.kl.KLPenalty`: the same estimate ``log π(a_t|s_t) − log π_ref(a_t|s_t)`` of the sampling
policy (``ACTION_LOGP``) against the frozen starting model (:data:`~agents.rllib.module.REF_LOGP`, both recorded by
the EnvRunner with the action), the same β. β itself is moved by :class:`agents.kl.KLController` in the driver
(:class:`agents.rllib.train.RLHFMetrics`), which hands it to every Learner, so that all Learners apply one β.
With ``learner_config_dict["reward_scaling"]``, the rewards are first divided by their running (winsorised) std,
measured by :class:`EpisodeRewardScaling`, as ``KLPenalty(scale_rewards=True)`` does in SB3.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule

from agents.kl import RewardScale
from agents.rllib.module import REF_LOGP

__all__ = ["KL_BETA", "REWARD_SCALING", "EpisodeRewardScaling", "KLRewardPenalty", "RLHFPPOLearner"]

KL_BETA = "kl_beta"
"""``learner_config_dict`` key of the initial β."""
REWARD_SCALING = "reward_scaling"
"""``learner_config_dict`` key: ``True`` divides rewards by their running (winsorised) std
(``TrainConfig.scales_rewards``)."""


class EpisodeRewardScaling(ConnectorV2):
    """Measure the running (winsorised) std of the episodes' rewards (:class:`agents.kl.RewardScale`), by which
    :class:`KLRewardPenalty` divides the rewards before it subtracts the penalty.

    The first piece of the Learner's pipeline, on the episode chunks as the EnvRunners sent them (read-only): the env
    pays an episode's reward with its last step, so a chunk that ends its episode returns that reward, and a chunk
    cut mid-episode (no reward yet) is not counted. The divisor goes to the later piece in ``shared_data``. Each
    Learner keeps its own statistics over the episodes it is given.
    """

    def __init__(self, input_observation_space: Any = None, input_action_space: Any = None, **kwargs: Any) -> None:
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.reward_scale = RewardScale()

    def __call__(
        self, *, batch: Any, episodes: list[Any], shared_data: dict | None = None, metrics: Any = None, **kw: Any
    ) -> Any:
        chunks = self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False)
        scale = self.reward_scale.update([float(chunk.get_return()) for chunk in chunks if chunk.is_done])
        if shared_data is not None:
            shared_data[REWARD_SCALING] = scale
        if metrics is not None:
            metrics.log_value("rlhf_reward_scale", scale, window=1)
        return batch

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        return self.reward_scale.state()

    def set_state(self, state: dict[str, Any]) -> None:
        if state:
            self.reward_scale.load_state(state)


class KLRewardPenalty(ConnectorV2):
    """Subtract ``β·(log π − log π_ref)`` from each timestep's reward in the train batch (before GAE), the rewards
    first divided by :class:`EpisodeRewardScaling`'s divisor when it runs (only an episode's last step holds one).

    The rows RLlib appends to each episode for GAE's bootstrap (``LOSS_MASK`` False: no action was taken there) are
    left alone. Logs ``rlhf_kl_per_token`` and ``rlhf_beta`` per update.

    :param beta: the KL coefficient (the driver sets it each iteration when it is adaptive).
    """

    def __init__(self, input_observation_space: Any = None, input_action_space: Any = None, *, beta: float) -> None:
        super().__init__(input_observation_space, input_action_space)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    def __call__(
        self,
        *,
        rl_module: RLModule,
        batch: dict[str, Any],
        episodes: list[Any],
        explore: bool | None = None,
        shared_data: dict | None = None,
        metrics: Any = None,
        **kwargs: Any,
    ) -> Any:
        for module_id, columns in batch.items():
            if REF_LOGP not in columns:
                raise KeyError(
                    f"module {module_id!r}'s episodes carry no {REF_LOGP!r}: the KL penalty needs EnvRunners that "
                    "record the reference log-probability with each action (CausalLMRLModule does)"
                )
            kl = columns[Columns.ACTION_LOGP] - columns[REF_LOGP]  # (N,) per-token estimate of KL(π‖π_ref)
            real = columns.get(Columns.LOSS_MASK)  # (N,) False on the appended bootstrap rows
            if real is not None:
                kl = torch.where(torch.as_tensor(real, device=kl.device), kl, torch.zeros_like(kl))
            rewards = columns[Columns.REWARDS] / float((shared_data or {}).get(REWARD_SCALING, 1.0))
            columns[Columns.REWARDS] = rewards - (self.beta * kl).to(rewards.dtype)
            if metrics is not None:
                tokens = int(real.sum()) if real is not None else kl.numel()
                metrics.log_value((module_id, "rlhf_kl_per_token"), float(kl.sum()) / max(1, tokens), window=1)
                metrics.log_value((module_id, "rlhf_beta"), self.beta, window=1)
        return batch


class RLHFPPOLearner(PPOTorchLearner):
    """RLlib's torch PPO Learner with :class:`KLRewardPenalty` before GAE, optimising the trainable tensors only.

    The initial β is ``config.learner_config_dict["kl_beta"]``; :meth:`set_kl_beta` changes it.
    """

    def build(self) -> None:
        super().build()
        if self._learner_connector is None:  # the pipeline then runs in aggregator actors, which never see this
            raise ValueError(
                "the RLHF KL penalty runs in the Learner's connector pipeline: set num_aggregator_actors_per_learner=0"
            )
        if KL_BETA not in self.config.learner_config_dict:
            raise KeyError(f"RLHFPPOLearner needs learner_config_dict={{{KL_BETA!r}: beta}} (the KL coefficient)")
        self._learner_connector.insert_before(
            GeneralAdvantageEstimation, KLRewardPenalty(beta=float(self.config.learner_config_dict[KL_BETA]))
        )
        if self.config.learner_config_dict.get(REWARD_SCALING):  # first: before any piece reads the rewards
            self._learner_connector.prepend(EpisodeRewardScaling())

    def get_parameters(self, module: RLModule) -> list[torch.nn.Parameter]:
        """What the optimizer steps and clips: frozen LM weights (LoRA's base, untrained blocks) are left out."""
        return [p for p in super().get_parameters(module) if p.requires_grad]

    def set_kl_beta(self, beta: float) -> None:
        """Set β of the KL penalty for the next updates."""
        self._learner_connector[KLRewardPenalty][0].beta = beta

    def kl_beta(self) -> float:
        """The β the next update applies."""
        return self._learner_connector[KLRewardPenalty][0].beta
