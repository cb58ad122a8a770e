"""The RLHF objective in RLlib: reward − β·KL(π‖π_ref) per token, applied in the Learner before GAE.

:class:`KLRewardPenalty` is a learner ConnectorV2 piece that :class:`RLHFPPOLearner` inserts right before RLlib's
``GeneralAdvantageEstimation``, so advantages and value targets see the penalised rewards, exactly as SB3 stores
them after :class:`agents.kl.KLPenalty`: the same estimate ``log π(a_t|s_t) − log π_ref(a_t|s_t)`` of the sampling
policy (``ACTION_LOGP``) against the frozen starting model (:data:`~agents.rllib.module.REF_LOGP`, both recorded by
the EnvRunner with the action), the same β. β itself is moved by :class:`agents.kl.KLController` in the driver
(:class:`agents.rllib.train.RLHFMetrics`), which hands it to every Learner, so that all Learners apply one β.
With ``learner_config_dict["reward_scale"]``, the rewards are first divided by that divisor: the spread of the base
model's rewards, measured once by the driver before training (:class:`agents.kl.RewardScale`), so every Learner
divides by the same number, as ``KLPenalty(scale_rewards=True)`` does in SB3.

Constraints (``learner_config_dict["constraints"]``, ``--constraint``) are charged in the same connector, as SB3's
``KLPenalty`` charges them: each Learner owns an :class:`agents.constraints.Lagrangian`, whose λ first takes its
dual step on this iteration's finished episodes, from the whole-episode quantities the EnvRunner measured
(:data:`QUANTITIES_KEY` in the episode's ``custom_data``: an episode's earlier chunks went to earlier iterations), and
then adds to β per token for ``kl`` bounds and charges each finished episode at its last token for the others (with
several Learners, the driver then gives them all the mean λ).

Minibatches are SB3's too (:class:`EpisodeMinibatches`): whole episodes, reshuffled each epoch, the rows RLlib
appends for GAE's bootstrap left out, so an iteration of 512 tokens takes 16 steps of about 128 as SB3's does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.policy.sample_batch import MultiAgentBatch, concat_samples
from ray.rllib.utils.minibatch_utils import MiniBatchCyclicIterator

from agents.buffers import cut_segments
from agents.constraints import Lagrangian, parse_constraints
from agents.rllib.module import REF_LOGP

__all__ = [
    "CONSTRAINTS",
    "KL_BETA",
    "QUANTITIES_KEY",
    "REWARD_SCALE",
    "EpisodeMinibatches",
    "KLRewardPenalty",
    "RLHFPPOLearner",
    "RealRowAdvantages",
]

KL_BETA = "kl_beta"
"""``learner_config_dict`` key of the initial β."""
REWARD_SCALE = "reward_scale"
"""``learner_config_dict`` key of the reward scale: the divisor of every paid reward (1: none;
``TrainConfig.scales_rewards``, measured by :func:`agents.run.base_rewards`)."""
CONSTRAINTS = "constraints"
"""``learner_config_dict`` key of the constraints: ``{"specs": ["kl<=6", ...], "lr": η, "init": λ0,
"margin_se": z, "components": [names a bound may use]}`` (``TrainConfig``'s ``constraints``, ``constraint_lr``,
``constraint_init``, ``constraint_margin_se``)."""
QUANTITIES_KEY = "textgen_quantities"
"""``custom_data`` key of a finished episode: its whole-episode quantities
(:func:`agents.constraints.episode_quantities` and a composite reward's components), set by the EnvRunner's
``on_episode_end``."""


class KLRewardPenalty(ConnectorV2):
    """Subtract ``β·(log π − log π_ref)`` from each timestep's reward in the train batch (before GAE), the rewards
    first divided by ``scale`` (only an episode's last step holds one).

    The rows RLlib appends to each episode for GAE's bootstrap (``LOSS_MASK`` False: no action was taken there) are
    left alone. Logs ``rlhf_kl_per_token`` and ``rlhf_beta`` per update.

    :param beta: the KL coefficient (the driver sets it each iteration when it is adaptive).
    :param scale: the reward scale, fixed for the run (1: the rewards as paid).
    :param constraints: multipliers charged after the penalty and stepped on each call's finished episodes.
    """

    def __init__(
        self,
        input_observation_space: Any = None,
        input_action_space: Any = None,
        *,
        beta: float,
        scale: float = 1.0,
        constraints: Lagrangian | None = None,
    ) -> None:
        super().__init__(input_observation_space, input_action_space)
        if beta < 0 or scale <= 0:
            raise ValueError(f"need beta >= 0 and scale > 0, got {beta} and {scale}")
        self.beta, self.scale, self.constraints = beta, scale, constraints

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
            rewards = columns[Columns.REWARDS] / self.scale
            if self.constraints is not None:  # the dual step first: the per-token price reads the stepped λ
                rewards = self._charge(rewards, real, episodes, metrics, module_id)
            price = self.beta + (self.constraints.kl_price if self.constraints is not None else 0.0)
            columns[Columns.REWARDS] = rewards - (price * kl).to(rewards.dtype)
            if metrics is not None:
                tokens = int(real.sum()) if real is not None else kl.numel()
                metrics.log_value((module_id, "rlhf_kl_per_token"), float(kl.sum()) / max(1, tokens), window=1)
                metrics.log_value((module_id, "rlhf_beta"), self.beta, window=1)
        return batch

    def _charge(self, rewards: torch.Tensor, real: Any, episodes: list[Any], metrics: Any, module_id: str) -> Any:
        """The dual step on the finished episodes, then each one's constraint charge at its last token. The batch
        holds the episodes' rows in order, each chunk closed by its bootstrap row (``real`` False)."""
        assert self.constraints is not None
        if real is None:
            raise KeyError(f"the constraints need the batch's {Columns.LOSS_MASK!r} to find where each episode ends")
        closing = np.flatnonzero(~np.asarray(real, dtype=bool))  # (chunks,) each chunk's bootstrap row
        if len(closing) != len(episodes):
            raise ValueError(f"{len(episodes)} episode chunks but {len(closing)} bootstrap rows in the batch")
        finished, rows = [], []
        for episode, end in zip(episodes, closing, strict=True):
            if episode.is_done:
                if QUANTITIES_KEY not in episode.custom_data:
                    raise KeyError(
                        f"a finished episode carries no {QUANTITIES_KEY!r}: the constraints need EnvRunners with the "
                        "RLHFMetrics callback, which measures each episode's quantities"
                    )
                finished.append(episode.custom_data[QUANTITIES_KEY])
                rows.append(int(end) - 1)  # its last token
        charges = self.constraints.end_episodes(finished)
        rewards = rewards.clone()
        for index, charge in zip(rows, charges, strict=True):
            rewards[index] -= charge
        for key, value in (self.constraints.take_logged() or {}).items():  # e.g. kl<=6/lambda
            if metrics is not None:
                metrics.log_value((module_id, f"constraint/{key}"), value, window=1)
        return rewards


class RealRowAdvantages(ConnectorV2):
    """Standardise the advantages over the rows where an action was taken, after RLlib's GAE standardised them
    over every row, the bootstrap row it appends to each episode chunk included (whose "advantage" is a value
    difference across two episodes). Standardising is affine, so this equals standardising the raw advantages over
    the real rows, as SB3's rollout normalisation does (:class:`agents.buffers.EpisodeRolloutBuffer`: population
    std + 1e-8)."""

    def __call__(self, *, rl_module: RLModule, batch: dict[str, Any], episodes: list[Any], **kwargs: Any) -> Any:
        for columns in batch.values():
            advantages, real = columns[Postprocessing.ADVANTAGES], columns.get(Columns.LOSS_MASK)
            if real is None:
                continue
            real = torch.as_tensor(real, device=advantages.device)
            kept = advantages[real]
            columns[Postprocessing.ADVANTAGES] = (advantages - kept.mean()) / (kept.std(correction=0) + 1e-8)
        return batch


class EpisodeMinibatches:
    """SB3's minibatches (:func:`agents.buffers.cut_segments`) over RLlib's train batch: each epoch the episode
    chunks in a new random order, cut into minibatches of about ``minibatch_size`` real rows at chunk boundaries.

    RLlib's own iterator cuts the episode-ordered batch into contiguous fixed-size slices, in the same order every
    epoch and with the bootstrap row GAE appended to each chunk (``LOSS_MASK`` False): 17 gradient steps on the
    same 4 groups of episodes where SB3 takes 16 on reshuffled ones. Those bootstrap rows are dropped here (their
    loss weight is 0; GAE has already used them), which also keeps an episode from being cut between minibatches.

    :param batch: the Learner's train batch, one module, each chunk ending in its bootstrap row.
    :param num_total_minibatches: with several Learners, RLlib's count that keeps them in lockstep (0: whole epochs).
    """

    def __init__(
        self,
        batch: MultiAgentBatch,
        *,
        num_epochs: int,
        minibatch_size: int,
        rng: np.random.Generator,
        num_total_minibatches: int = 0,
    ) -> None:
        if len(batch.policy_batches) != 1:
            raise ValueError(f"EpisodeMinibatches trains one module, got {sorted(batch.policy_batches)}")
        ((self.module_id, self.rows),) = batch.policy_batches.items()
        real = np.asarray(self.rows[Columns.LOSS_MASK], dtype=bool)  # (N,) False on each chunk's bootstrap row
        ends = np.flatnonzero(~real)  # the bootstrap rows close their chunks
        if not len(ends) or ends[-1] != len(real) - 1:
            raise ValueError("EpisodeMinibatches needs a batch whose every episode chunk ends in GAE's bootstrap row")
        starts = np.concatenate([[0], ends[:-1] + 1])
        self.chunks = [np.arange(a, b) for a, b in zip(starts, ends, strict=True) if b > a]
        self.num_epochs, self.minibatch_size, self.rng = num_epochs, minibatch_size, rng
        self.num_total_minibatches, self.env_steps = num_total_minibatches, len(batch)

    def __iter__(self) -> Iterator[MultiAgentBatch]:
        done, epoch = 0, 0
        while (done < self.num_total_minibatches) if self.num_total_minibatches else (epoch < self.num_epochs):
            order = [self.chunks[i] for i in self.rng.permutation(len(self.chunks))]
            for indices in cut_segments(order, self.minibatch_size):
                if self.num_total_minibatches and done == self.num_total_minibatches:
                    break
                runs = np.split(indices, np.flatnonzero(np.diff(indices) != 1) + 1)  # contiguous chunks: slices
                rows = concat_samples([self.rows[int(run[0]) : int(run[-1]) + 1] for run in runs])
                yield MultiAgentBatch({self.module_id: rows}, self.env_steps)
                done += 1
            epoch += 1


class RLHFPPOLearner(PPOTorchLearner):
    """RLlib's torch PPO Learner with :class:`KLRewardPenalty` before GAE and :class:`RealRowAdvantages` after it,
    optimising the trainable tensors only, with SB3's Adam, on SB3's minibatches (:class:`EpisodeMinibatches`).

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
        settings = self.config.learner_config_dict
        constraints = None
        if settings.get(CONSTRAINTS):
            spec = settings[CONSTRAINTS]
            bounds = parse_constraints(spec["specs"], components=spec.get("components", ()))
            constraints = Lagrangian(bounds, float(spec["lr"]), float(spec["init"]), float(spec["margin_se"]))
        penalty = KLRewardPenalty(
            beta=float(settings[KL_BETA]), scale=float(settings.get(REWARD_SCALE, 1.0)), constraints=constraints
        )
        self._learner_connector.insert_before(GeneralAdvantageEstimation, penalty)
        self._learner_connector.insert_after(GeneralAdvantageEstimation, RealRowAdvantages())
        self._minibatch_rng = np.random.default_rng(self.config.seed)

    def _create_iterator_if_necessary(self, *, training_data: Any, **kwargs: Any) -> Any:
        """RLlib's iterator, with its contiguous slices replaced by :class:`EpisodeMinibatches` of the same batch."""
        iterator = super()._create_iterator_if_necessary(training_data=training_data, **kwargs)
        if not isinstance(iterator, MiniBatchCyclicIterator):  # a data iterator, or one batch and one epoch
            return iterator
        return EpisodeMinibatches(
            iterator._batch,
            num_epochs=kwargs.get("num_epochs", 1),
            minibatch_size=kwargs["minibatch_size"] or iterator._batch.count,
            rng=self._minibatch_rng,
            num_total_minibatches=kwargs.get("num_total_minibatches", 0),
        )

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        """The optimizer the module's policy builds on the SB3 path (``CausalLMPolicy.optimizer_settings``: SB3's
        Adam, ε 1e-5), on the trainable tensors. RLlib's plain ``Adam(params)`` has ε 1e-8, which steps the LoRA
        coordinates whose gradients are far below 1e-5 (all of A while B is near its zero start) at nearly the full
        learning rate."""
        module = self.module[module_id]
        params = self.get_parameters(module)
        optimizer_class, kwargs = module.unwrapped().policy.optimizer_settings()
        optimizer = optimizer_class(params, **kwargs)
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params, lr_or_lr_schedule=config.lr)

    def get_parameters(self, module: RLModule) -> list[torch.nn.Parameter]:
        """What the optimizer steps and clips: frozen LM weights (LoRA's base, untrained blocks) are left out."""
        return [p for p in super().get_parameters(module) if p.requires_grad]

    def set_kl_beta(self, beta: float) -> None:
        """Set β of the KL penalty for the next updates."""
        self._learner_connector[KLRewardPenalty][0].beta = beta

    def kl_beta(self) -> float:
        """The β the next update applies."""
        return self._learner_connector[KLRewardPenalty][0].beta

    def constraint_state(self) -> dict[str, Any] | None:
        """The multipliers' state (:meth:`agents.constraints.Lagrangian.state`; ``None`` without constraints), which
        the driver saves beside RLlib's checkpoint (RLlib saves no connector state)."""
        constraints = self._learner_connector[KLRewardPenalty][0].constraints
        return None if constraints is None else constraints.state()

    def load_constraint_state(self, state: dict[str, Any]) -> None:
        """Go on with the multipliers of :meth:`constraint_state` (a resumed run)."""
        constraints = self._learner_connector[KLRewardPenalty][0].constraints
        if constraints is None:
            raise ValueError("this Learner has no constraints to load multipliers into")
        constraints.load_state(state)
