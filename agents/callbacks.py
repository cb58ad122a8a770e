"""Callbacks that make an RLHF run readable: reward-model and gold scores per rollout, sample completions."""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import TensorBoardOutputFormat

__all__ = ["TextMetrics"]


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
        self._rm: list[float] = []
        self._gold: list[float] = []
        self._samples: list[str] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "gold_score" in info:
                self._rm.append(info["reward_model_score"])
                self._gold.append(info["gold_score"])
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
        self.history.append(row)
        self.logger.record("rlhf/reward_model_score", row["reward_model_score"])
        self.logger.record("rlhf/gold_score", row["gold_score"])
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                fmt.writer.add_text("rlhf/samples", "\n\n".join(self._samples), self.num_timesteps)
        self._rm, self._gold, self._samples = [], [], []
