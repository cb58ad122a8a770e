"""Callbacks of an RLHF run: reward-model and gold scores per rollout, sample completions, held-out evaluation along
training, and sparing SB3's value bootstrap when every episode ended with the rollout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat

__all__ = ["HeldOutEvaluation", "ReferenceEMA", "SkipFinishedBootstrap", "TextMetrics"]


class TextMetrics(BaseCallback):
    """Log, every rollout, the mean reward-model and gold score of the episodes that ended in it.

    Scalars go to SB3's logger (stdout, CSV, TensorBoard) as ``rlhf/reward_model_score`` and
    ``rlhf/gold_score``; with TensorBoard, ``n_samples`` completions are also written as text. Each row of
    :attr:`history` also holds ``kl`` (nats per episode) when a :class:`~agents.kl.KLPenalty` comes before this
    callback in the callback list (as in :meth:`agents.run.Run.callbacks`), which logs it at the same rollout end.
    """

    def __init__(self, n_samples: int = 4, verbose: int = 0) -> None:
        super().__init__(verbose)
        self.n_samples = n_samples
        self.history: list[dict[str, float]] = []  # one row per rollout, for plots and reports
        self.held_out: list[dict[str, float]] = []  # --eval-every: the held-out summary after every N-th update
        self._rm: list[float] = []
        self._gold: list[float] = []
        self._samples: list[str] = []
        self._components: dict[str, list[float]] = {}

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "gold_score" in info:
                self._rm.append(info["reward_model_score"])
                self._gold.append(info["gold_score"])
                for name, score in info.get("reward_components", {}).items():  # a composite reward's parts
                    self._components.setdefault(name, []).append(score)
                if len(self._samples) < self.n_samples:
                    self._samples.append(f"**{info['prompt']}** {info['completion']}")
        return True

    def _on_rollout_end(self) -> None:
        if not self._rm:
            return
        row = {
            "timesteps": float(self.num_timesteps),
            "reward_model_score": float(np.mean(self._rm)),
            "gold_score": float(np.mean(self._gold)),
        }
        kl = self.logger.name_to_value.get("rlhf/kl_per_episode")  # logged just before by a KLPenalty, if one runs
        if kl is not None:  # scores against KL per rollout: what a Gao et al. (2022) plot needs
            row["kl"] = float(kl)
        for key, value in self.logger.name_to_value.items():  # the multipliers' quantities and λ, when constrained
            if key.startswith("constraint/"):
                row[key] = float(value)
        for name, scores in self._components.items():
            row[f"reward/{name}"] = float(np.mean(scores))
            self.logger.record(f"rlhf/reward/{name}", row[f"reward/{name}"])
        self.history.append(row)
        self.logger.record("rlhf/reward_model_score", row["reward_model_score"])
        self.logger.record("rlhf/gold_score", row["gold_score"])
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_text("rlhf/samples", "\n\n".join(self._samples), self.num_timesteps)
        self._rm, self._gold, self._samples, self._components = [], [], [], {}


class SkipFinishedBootstrap(BaseCallback):
    """Spare the value pass that SB3 throws away when every episode ends with the rollout.

    After its last step, SB3's ``collect_rollouts`` asks ``policy.predict_values(new_obs)`` for the values to
    bootstrap the returns with, then multiplies them by 0 for every env whose episode just ended (its observation is
    already the next episode's first). When all of them ended, as in ``textgen train`` (``n_steps`` =
    ``max_new_tokens``), that is a full pass over fresh prompts for nothing: 0.5 s of a 7 s rollout of 16 x 32
    tokens on 2 AMD cores. At such a last step this callback has that one call answer 0 without running the policy,
    which changes no return or advantage (SB3 zeroes those values; tested). The call is recognised by its
    observations, equal to the step's ``new_obs``; every other call runs as it is, and a rollout that ends with an
    episode still running bootstraps as usual. Works with every SB3 on-policy algorithm and any policy.
    """

    def __init__(self, verbose: int = 0) -> None:
        super().__init__(verbose)
        self._armed: Any = None  # the new_obs of a last step at which every episode ended
        self._n_envs = 0

    def _on_step(self) -> bool:
        last = self.locals.get("n_steps", -2) + 1 == self.locals.get("n_rollout_steps", -1)
        if last and np.all(self.locals["dones"]) and "predict_values" not in self.model.policy.__dict__:
            self._armed, self._n_envs = self.locals["new_obs"], len(self.locals["dones"])
            self.model.policy.predict_values = self._predict_values  # type: ignore[method-assign]
        return True

    def _predict_values(self, obs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        policy = self.model.policy
        if args or kwargs or not _equal_observations(obs, self._armed):  # e.g. a truncated episode's own value
            return type(policy).predict_values(policy, obs, *args, **kwargs)
        self._disarm()
        return torch.zeros(self._n_envs, 1, device=policy.device)

    def _disarm(self) -> None:
        self._armed = None
        self.model.policy.__dict__.pop("predict_values", None)

    def _on_rollout_end(self) -> None:
        self._disarm()  # a rollout stopped early by another callback never made the call

    def _on_training_end(self) -> None:
        self._disarm()


def _equal_observations(obs: Any, new_obs: Any) -> bool:
    """Whether SB3's tensors ``obs`` hold the arrays ``new_obs`` (a dict of them, or one)."""
    if new_obs is None:
        return False
    if isinstance(new_obs, dict):
        return (
            isinstance(obs, dict)
            and obs.keys() == new_obs.keys()
            and all(_equal_observations(obs[k], new_obs[k]) for k in new_obs)
        )
    if not isinstance(obs, torch.Tensor):
        return False
    array = torch.as_tensor(np.asarray(new_obs))
    return obs.shape == array.shape and torch.equal(obs.cpu(), array.to(obs.dtype))


class HeldOutEvaluation(BaseCallback):
    """Evaluate the held-out prompts after every ``every``-th update (``--eval-every``), as a row of
    :attr:`TextMetrics.held_out` (``timesteps``, :attr:`~agents.evaluate.Evaluation.summary`, ``train_seconds``
    so far and ``eval_seconds``) and SB3's logger (``eval/gold_score``, ...): held-out gold and KL along training,
    not only before and after.

    It runs when the next rollout starts, so the policy it measures has just been updated (the last update is the
    report's "after"), with the torch RNG left as it was, and the policy's rollout caches emptied again after it, as
    a rollout starts with them, so training goes on exactly as without it.

    :param evaluate: what measures the policy (:meth:`agents.run.Run.evaluate`).
    :param metrics: the run's :class:`TextMetrics`, which keeps the rows (and a checkpoint with them).
    """

    def __init__(self, evaluate: Callable[[], Any], metrics: TextMetrics, every: int, verbose: int = 0) -> None:
        super().__init__(verbose)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.evaluate, self.metrics, self.every = evaluate, metrics, every

    def _on_training_start(self) -> None:
        self._started, self._evaluating = time.perf_counter(), 0.0

    def _on_rollout_start(self) -> None:
        timesteps = int(self.model.num_timesteps)
        updates = timesteps // (self.model.n_steps * self.model.n_envs)  # type: ignore[attr-defined]  # a resume's too
        done = self.metrics.held_out and self.metrics.held_out[-1]["timesteps"] == timesteps
        if not updates or updates % self.every or done:
            return
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            summary = self.evaluate().summary
        policy = self.model.policy
        policy.set_training_mode(True)  # back to the state a rollout starts from: caches and sampled nuclei empty
        policy.set_training_mode(False)
        row = {"timesteps": float(timesteps), **{k: float(v) for k, v in summary.items()}}
        row["train_seconds"] = started - self._started - self._evaluating  # of this learn() call, evaluation excluded
        row["eval_seconds"] = time.perf_counter() - started
        self._evaluating += row["eval_seconds"]
        self.metrics.held_out.append(row)
        for key, value in summary.items():
            self.logger.record(f"eval/{key}", float(value))

    def _on_step(self) -> bool:
        return True


class ReferenceEMA(BaseCallback):
    """After every update, move the policy's KL reference toward it (``CausalLMPolicy.follow_policy``, with the
    policy's ``reference_ema``): when the next rollout starts, so the update has happened, and before its KL."""

    def _on_training_start(self) -> None:
        self._updated = False

    def _on_rollout_start(self) -> None:
        if self._updated:
            self.model.policy.follow_policy()
        self._updated = False

    def _on_rollout_end(self) -> None:
        self._updated = True  # the update follows

    def _on_step(self) -> bool:
        return True
