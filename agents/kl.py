"""The KL leash of RLHF, for every SB3 on-policy algorithm: reward - β·KL(π‖π_ref).

:class:`KLPenalty` is a callback that subtracts ``β·(log π(a_t|s_t) − log π_ref(a_t|s_t))`` from every step's reward
in the rollout buffer *before* SB3 computes returns and advantages from them. Every algorithm therefore optimises
the same per-token-penalised return, exactly as in Ziegler et al. (2019) and InstructGPT, without any change to the
algorithm.

``log π(a_t|s_t)`` is what the policy stored while sampling (``rollout_buffer.log_probs``). ``log π_ref`` is computed
once the rollout is complete, in batched passes over its episodes (each episode's steps read off one forward pass of
its longest observation, the prompt prefix shared) rather than by a reference decode step beside every policy step:
SB3 calls ``rollout_buffer.compute_returns_and_advantage`` right after its last step, and the callback runs the
pass at that call (a hook it sets on the buffer at each rollout's start), then lets the buffer go on. Every
on-policy algorithm of SB3 and sb3-contrib (PPO, A2C, TRPO, MaskablePPO, RecurrentPPO) fills one such buffer.

With ``scale_rewards``, the episodes' rewards are first divided by the spread of the base policy's rewards
(:class:`RewardScale`, measured once before training), so that β means the same for a gold scorer as for a
normalised reward model.

The KL of an episode is summed over its tokens until it ends, across rollouts when it spans several (``max_new_tokens``
above ``n_steps``); ``rlhf/kl_per_episode`` and the adaptive β see completed episodes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.cached_lm import reference_log_probs

if TYPE_CHECKING:
    from agents.constraints import Lagrangian

__all__ = ["DEFAULT_BETA", "KLController", "KLPenalty", "RewardScale"]

DEFAULT_BETA = 0.1
"""β of ``textgen train`` and of these classes unless told otherwise, per unit of a normalised reward model (base
samples score mean 0, std 1). Chosen over 3 seeds of ``textgen train`` (benchmarks/results/textgen_train_seeds.md):
0.05 gained a little more gold but drifted up to 13.8 nats from the base model and lost diversity on one seed;
re-checked against 0.12 with the blocks 1 + 20 reward model (no better on the worst seed)."""


class KLController:
    """β, fixed or adaptive. Adaptive is Ziegler et al.'s proportional controller toward a target KL.

    :param beta: initial KL coefficient.
    :param target: target KL per episode in nats (``None``: β stays fixed).
    :param horizon: the controller's time constant: β moves by a factor ``1 + error·n/horizon`` after ``n`` episodes,
        the error clipped to ±0.2, so by at most e^0.2 over ``horizon`` episodes (``textgen train`` derives it from
        the run's length: :func:`agents.run.kl_horizon`).
    """

    def __init__(self, beta: float = DEFAULT_BETA, target: float | None = None, horizon: int = 10_000) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_episodes: int) -> float:
        """Move β after a rollout whose mean per-episode KL was ``kl`` over ``n_episodes``; return the new β."""
        if self.target is not None and n_episodes > 0:
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + error * n_episodes / self.horizon
        return self.beta


class RewardScale:
    """The divisor of a reward on no normalised scale: the spread of the base policy's rewards, measured once.

    β is per unit of a normalised reward (:data:`DEFAULT_BETA`). ``train-rm`` scales a learned reward model once, so
    that the base policy's samples score std 1; a gold scorer (ROUGE-L, chrF, tests passed) is not scaled, and its
    spread of ~0.1 against β = 0.1 per nat kept the dialogue and summarize-docstring policies within 0.5 nats of the
    base model, gold unchanged (benchmarks/results/tasks.md). Dividing every reward by the spread of the base policy's
    rewards puts any scorer on that scale, measured the way the reward models are: once, on base samples, before
    training, and then fixed. (A running spread of the policy's own rewards, the form before, falls as the policy
    sharpens, and with it the divisor, so the effective leash β·s weakened just when over-optimisation is likeliest.)

    The spread is a *winsorised* std: the std of the rewards after clipping them to their ``trim`` and ``1 - trim``
    quantiles. A plain std is set by a scorer's rare penalties: 2.6 % of the base model's dialogue replies are echoes
    or empty and score near −1 while the rest spread 0.068 chrF, so the std (0.175) made an ordinary reply's advantage
    2.6 times smaller against β than a reward model's; winsorised, 0.061. A reward with two values (tests all pass or
    all fail) keeps its std: the quantiles are its two values.

    :param min_std: the divisor's floor, so that a reward that hardly varies on base samples (every test failed) is not
        blown up by a tiny spread.
    :param trim: the quantile, on each side, beyond which rewards are clipped before their std is taken.
    """

    def __init__(self, min_std: float = 0.01, trim: float = 0.05) -> None:
        if min_std <= 0 or not 0 <= trim < 0.5:
            raise ValueError(f"need min_std > 0 and 0 <= trim < 0.5; got {min_std}, {trim}")
        self.min_std, self.trim = min_std, trim
        self.value: float | None = None  # measured: the divisor; None until then

    @property
    def measured(self) -> bool:
        return self.value is not None

    @property
    def scale(self) -> float:
        """The divisor (1 before it is measured)."""
        return 1.0 if self.value is None else self.value

    def spread(self, rewards: np.ndarray | list[float]) -> float:
        """The winsorised std of ``rewards`` (at least ``min_std``)."""
        rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if rewards.size < 2:
            raise ValueError(f"the reward scale needs at least 2 rewards of base samples, got {rewards.size}")
        low, high = np.quantile(rewards, [self.trim, 1.0 - self.trim])
        return max(float(np.clip(rewards, low, high).std()), self.min_std)

    def measure(self, rewards: np.ndarray | list[float]) -> float:
        """Fix the divisor at the spread of the base policy's ``rewards``; return it."""
        self.value = self.spread(rewards)
        return self.value

    def state(self) -> dict[str, float | None]:
        """The divisor, to save with a run (a resumed run divides as the uninterrupted one does)."""
        return {"scale": self.value}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned. A checkpoint of the running form (a window of recent rewards, or a
        running mean, variance and count before that) is resumed with its spread, fixed from then on."""
        if "scale" in state:
            self.value = None if state["scale"] is None else float(state["scale"])
        elif len(state.get("recent", ())) >= 2:
            self.value = self.spread(state["recent"])
        elif state.get("count", 0) >= 1:
            self.value = max(float(np.sqrt(state["var"])), self.min_std)


class PromptBaseline:
    """RLOO's baseline for an env whose envs answer prompts in groups (``TextGenVecEnv(prompt_group=K)``): each
    finished episode's reward less the mean reward of the other answers of its group to the same prompt that have
    finished by the end of the rollout (those of earlier rollouts included).

    Why: on a task whose score depends mostly on the prompt (dialogue's chrF: 62 % of its variance over base samples
    lies between prompts, benchmarks/results/dialogue_gold.md), a run that meets each prompt once leaves that share in
    the advantages unless the value head learns every prompt's expected score. The peers' rewards do not depend on
    the episode's own actions, so the policy gradient stays unbiased (Kool et al. 2019; Ahmadian et al. 2024). An
    answer whose peers have not finished yet keeps its reward whole.

    :param group: envs per group (the env's ``prompt_group``); env ``i`` is in group ``i // group``.
    """

    def __init__(self, group: int) -> None:
        if group < 2:
            raise ValueError(f"a prompt baseline needs groups of at least 2 envs, got {group}")
        self.group = group
        self._episodes: dict[int, int] = {}  # env -> episodes it has finished: the k-th answers of a group pair up
        self._answers: dict[tuple[int, int], dict[int, tuple[str, float]]] = {}  # (group, k) -> env -> prompt, reward

    def subtract(self, rewards: np.ndarray, finished: list[tuple[int, int, str, float]], scale: float) -> list[float]:
        """Subtract the baseline, in place, from ``rewards`` ``(n_steps, n_envs)`` at each finished episode
        ``(step, env, prompt, reward paid)`` of a rollout (in step order; ``rewards`` already divided by ``scale``).

        :return: the baselines subtracted (one per episode that had peers), in the rewards' units.
        """
        placed = []
        for step, env, prompt, paid in finished:
            k = self._episodes.get(env, 0)
            self._episodes[env] = k + 1
            key = (env // self.group, k)
            self._answers.setdefault(key, {})[env] = (prompt, paid)
            placed.append((step, env, prompt, key))
        subtracted = []
        for step, env, prompt, key in placed:
            peers = [r for e, (p, r) in self._answers[key].items() if e != env and p == prompt]
            if peers:
                subtracted.append(float(np.mean(peers)) / scale)
                rewards[step, env] -= subtracted[-1]
        for key in {key for *_, key in placed}:
            if len(self._answers[key]) == self.group:  # every answer is in: none will read them again
                del self._answers[key]
        return subtracted


class KLPenalty(BaseCallback):
    """Per-token KL penalty in the rewards of each rollout, with logging of KL and β every rollout.

    :param beta: the KL coefficient (initial value when adaptive).
    :param target_kl: nats per episode that an adaptive β steers toward (Ziegler et al.); ``None``: β stays fixed.
    :param horizon: the adaptive controller's horizon, in episodes.
    :param reference: where ``log π_ref`` comes from: a model name/directory loads that LM; ``None`` uses the
        policy's own frozen reference (``CausalLMPolicy.reference_log_prob``) or, for policies without an LM
        prior (``MultiInputPolicy`` baselines), the env's LM, so that all methods are leashed to the same one.
    :param envs_per_pass: episodes of this many envs (all their steps in the rollout) go through the reference
        together; ``None`` (the default): all envs in one pass. Fewer bound the pass's memory (its logits are
        about ``envs_per_pass * n_steps * V`` bf16 values, 50 MB for 16 x 32 steps of SmolLM2) but cost time: each
        pass encodes the shared prompt prefix again and runs smaller matmuls (on SmolLM2, 16 envs x 32 steps at
        one thread: 1.2 s in one pass, 1.8 s in 4).
    :param scale_rewards: divide each episode's reward by the spread of the base policy's rewards
        (:class:`RewardScale`) before the penalty, for a reward not already normalised like a learned reward model.
    :param base_rewards: with ``scale_rewards``, a function that samples the base policy and returns the rewards the
        env pays it (:func:`agents.run.base_rewards`), called once when training starts unless the scale was
        restored from a checkpoint (:meth:`RewardScale.load_state`).
    :param constraints: Lagrange multipliers for bounds on per-episode quantities
        (:class:`agents.constraints.Lagrangian`), stepped on each rollout's finished episodes and then charged in
        the same rewards after the penalty.

    Where the env answers prompts in groups (its ``prompt_group`` above 1), each episode's reward also loses the
    :class:`PromptBaseline` of its group, after the scaling and before the penalty.
    """

    def __init__(
        self,
        beta: float = DEFAULT_BETA,
        target_kl: float | None = None,
        horizon: int = 10_000,
        reference: str | None = None,
        envs_per_pass: int | None = None,
        scale_rewards: bool = False,
        base_rewards: Callable[[], np.ndarray] | None = None,
        constraints: Lagrangian | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        if envs_per_pass is not None and envs_per_pass < 1:
            raise ValueError(f"envs_per_pass must be >= 1 (or None: all envs), got {envs_per_pass}")
        self.controller = KLController(beta, target_kl, horizon)
        self.reward_scale = RewardScale() if scale_rewards else None
        self.base_rewards = base_rewards
        self.constraints = constraints
        self.reference = reference
        self.envs_per_pass = envs_per_pass
        self._reference_lm: Any = None  # log π_ref of the named reference LM, when there is one
        self._pending = False  # a rollout is being collected: its rewards are not penalised yet
        self._dones: list[np.ndarray] = []  # (n_envs,) per step of the rollout: which episodes ended there
        self._paid: list[np.ndarray] = []  # (n_envs,) per step: the rewards the env paid (non-zero at episode ends)
        self._components: list[dict[int, dict[str, float]]] = []  # per step: a composite reward's parts, by env
        self.prompt_baseline: PromptBaseline | None = None  # set at the start of training if the env has groups
        self._finished: list[list[tuple[int, str, float]]] = []  # per step: (env, prompt, reward) of episodes ending
        self._running = np.zeros(0)  # (n_envs,) KL of each env's episode in progress, carried across rollouts
        self._completed: list[float] = []  # KL of each episode that ended in this rollout
        self._kl_sum = 0.0
        self._tokens = 0

    def _on_training_start(self) -> None:
        self._running = np.zeros(self.training_env.num_envs)  # episodes in flight start again (a resume too)
        try:
            group = int(self.training_env.get_attr("prompt_group")[0])
        except AttributeError:  # an env of another kind: no groups
            group = 1
        if group > 1 and (self.prompt_baseline is None or self.prompt_baseline.group != group):
            self.prompt_baseline = PromptBaseline(group)
        if self.constraints is not None:
            self.constraints.start(self.training_env.num_envs)
        if self.reward_scale is not None and not self.reward_scale.measured:
            if self.base_rewards is None:
                raise ValueError(
                    "KLPenalty(scale_rewards=True) divides by the spread of the base policy's rewards: pass "
                    "base_rewards=... (a function that samples the base policy, e.g. agents.run.Run.base_rewards)"
                )
            scale = self.reward_scale.measure(self.base_rewards())
            if self.verbose:
                print(f"reward scale: {scale:.4f} (winsorised std of the base policy's rewards)")
        if self.reference is None and not hasattr(self.model.policy, "reference_log_prob"):
            try:  # a policy without an LM prior: leash it to the LM of the env it acts in
                self.reference = self.training_env.get_attr("model_name")[0]
            except AttributeError:
                raise TypeError(
                    f"{type(self.model.policy).__name__} has no reference model and the env names no LM: pass "
                    "KLPenalty(reference='default') (or the model the env was built on)"
                ) from None
        if self.reference is not None:
            self._reference_lm = reference_log_probs(self.reference, self.model.device, cached=False)

    def reference_log_prob(self, obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """``log π_ref(a|s)`` ``(B,)`` of a batch of steps of whole episodes (any order), in one pass per episode."""
        if self._reference_lm is None:
            return self.model.policy.reference_log_prob(obs, actions, cached=False)
        return self._reference_lm(obs, actions)

    def _on_rollout_start(self) -> None:
        buffer = self.model.rollout_buffer
        compute = type(buffer).compute_returns_and_advantage  # the class's own: never wrap a wrapper

        def penalise_then_compute(*args: Any, **kwargs: Any) -> None:
            if self._pending:
                self.penalise(buffer)
            compute(buffer, *args, **kwargs)

        buffer.compute_returns_and_advantage = penalise_then_compute  # type: ignore[method-assign]
        self._pending = True
        self._dones, self._paid, self._components, self._finished = [], [], [], []

    def penalise(self, buffer: Any) -> np.ndarray:
        """Subtract ``β·(log π − log π_ref)`` from every step's reward in a full rollout buffer, in place (the
        episodes' rewards first divided by :class:`RewardScale`'s divisor, with ``scale_rewards``).

        :param buffer: an SB3 rollout buffer before ``compute_returns_and_advantage`` (arrays ``(n_steps, n_envs,
            ...)``; observations ``input_ids`` / ``attention_mask`` of ``(n_steps, n_envs, L)``).
        :return: the per-token KL estimates ``(n_steps, n_envs)``.
        """
        self._pending = False
        release = getattr(self.model.policy, "release_rollout_cache", None)
        if release is not None:  # SB3 has taken the rollout's last step and bootstrap values
            release()
        if self.reward_scale is not None:
            self._scale_rewards(buffer)
        if self.prompt_baseline is not None:
            self._subtract_baseline(buffer)
        n_steps, n_envs = buffer.rewards.shape
        kl = np.zeros((n_steps, n_envs), dtype=np.float32)
        ref = np.zeros((n_steps, n_envs), dtype=np.float32)
        step = n_envs if self.envs_per_pass is None else self.envs_per_pass
        for first in range(0, n_envs, step):
            envs = slice(first, min(n_envs, first + step))  # all steps of these envs: whole episodes
            obs = {
                key: torch.as_tensor(buffer.observations[key][:, envs]).reshape(-1, buffer.observations[key].shape[-1])
                for key in ("input_ids", "attention_mask")
            }  # (n_steps * e, L)
            actions = torch.as_tensor(buffer.actions[:, envs]).reshape(-1).long()  # (n_steps * e,)
            obs = {k: v.to(self.model.device) for k, v in obs.items()}
            log_ref = self.reference_log_prob(obs, actions.to(self.model.device)).float().cpu().numpy()
            log_pi = buffer.log_probs[:, envs].reshape(-1)  # what the policy stored while sampling
            kl[:, envs] = (log_pi - log_ref).reshape(n_steps, -1)  # unbiased per-token estimate of KL(π‖π_ref)
            ref[:, envs] = log_ref.reshape(n_steps, -1)
        buffer.rewards -= (self.controller.beta * kl).astype(buffer.rewards.dtype)
        dones = np.stack(self._dones[:n_steps])
        if self.constraints is not None:
            actions = np.asarray(buffer.actions).reshape(n_steps, n_envs)
            self.constraints.charge(buffer.rewards, kl, ref, actions, dones, self._components[:n_steps])
        self._account(kl, dones)
        return kl

    def _account(self, kl: np.ndarray, dones: np.ndarray) -> None:
        """Add a rollout's per-token KL ``(n_steps, n_envs)`` to each env's episode in progress; an episode that ends
        (``dones``, same shape) adds its whole KL, over every rollout it spanned, to :attr:`_completed`."""
        for step_kl, ended in zip(kl, dones.astype(bool), strict=True):
            self._running += step_kl
            self._completed.extend(self._running[ended].tolist())
            self._running[ended] = 0.0
        self._kl_sum += float(kl.sum())
        self._tokens += kl.size

    def _scale_rewards(self, buffer: Any) -> None:
        """Divide the rewards the env paid in this rollout by :class:`RewardScale`'s divisor (only those: a row may
        also hold a bootstrap value SB3 added, already in the scaled units the value head learns)."""
        assert self.reward_scale is not None
        paid = np.stack(self._paid[: buffer.rewards.shape[0]])  # (n_steps, n_envs), 0 but at episode ends
        scale = self.reward_scale.scale
        buffer.rewards += (paid / scale - paid).astype(buffer.rewards.dtype)
        self.logger.record("rlhf/reward_scale", scale)

    def _subtract_baseline(self, buffer: Any) -> None:
        """Subtract :class:`PromptBaseline`'s baseline from this rollout's finished episodes' rewards; log its mean
        and the share of episodes that had one."""
        assert self.prompt_baseline is not None
        finished = [
            (t, *episode) for t, step in enumerate(self._finished[: buffer.rewards.shape[0]]) for episode in step
        ]
        scale = self.reward_scale.scale if self.reward_scale is not None else 1.0
        subtracted = self.prompt_baseline.subtract(buffer.rewards, finished, scale)
        if finished:
            self.logger.record("rlhf/prompt_baseline_share", len(subtracted) / len(finished))
        if subtracted:
            self.logger.record("rlhf/prompt_baseline", float(np.mean(subtracted)))

    def _on_step(self) -> bool:
        self._dones.append(np.asarray(self.locals["dones"], dtype=bool).copy())
        if self.prompt_baseline is not None:  # which prompt each finished episode answered, and its reward
            rewards, infos = self.locals["rewards"], self.locals.get("infos", ())
            self._finished.append(
                [(int(i), infos[i].get("prompt", ""), float(rewards[i])) for i in np.flatnonzero(self._dones[-1])]
            )
        if self.constraints is not None:  # a composite reward's components, which a constraint may bound
            parts = "reward_components"
            self._components.append({i: x[parts] for i, x in enumerate(self.locals.get("infos", ())) if parts in x})
        if self.reward_scale is not None:  # the env pays an episode's reward with its last step
            self._paid.append(np.where(self._dones[-1], np.asarray(self.locals["rewards"], dtype=np.float64), 0.0))
        return True

    def _on_rollout_end(self) -> None:
        if self._tokens == 0:
            return
        self.logger.record("rlhf/kl_per_token", self._kl_sum / self._tokens)
        self.logger.record("rlhf/beta", self.controller.beta)
        floor = getattr(self.model.policy, "sampling_kl_floor", lambda: None)()
        if floor is not None:  # top-k / top-p sampling alone puts this much KL per token under the estimate
            self.logger.record("rlhf/sampling_kl_floor", floor)
        if self._completed:  # an episode's KL over all its tokens, when it has ended (it may span rollouts)
            kl_episode = float(np.mean(self._completed))
            self.logger.record("rlhf/kl_per_episode", kl_episode)
            self.controller.update(kl_episode, len(self._completed))
        self._kl_sum, self._tokens, self._completed = 0.0, 0, []
        logged = self.constraints.take_logged() if self.constraints is not None else None
        for key, value in (logged or {}).items():  # e.g. constraint/kl<=6/lambda
            self.logger.record(f"constraint/{key}", value)

    def _on_training_end(self) -> None:
        self._pending = False
        self.model.rollout_buffer.__dict__.pop("compute_returns_and_advantage", None)  # the class's own again

    def state(self) -> dict[str, Any]:
        """β and the controller settings (and the reward scale's statistics, when it scales), to save with a run."""
        state: dict[str, Any] = {
            "beta": self.controller.beta, "target": self.controller.target, "horizon": self.controller.horizon,
        }  # fmt: skip
        if self.reward_scale is not None:
            state["reward_scale"] = self.reward_scale.state()
        if self.constraints is not None:
            state["constraints"] = self.constraints.state()
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved (β, the reward scale, the multipliers), so that a resumed run goes on as
        the uninterrupted one would."""
        self.controller.beta = state["beta"]
        if self.reward_scale is not None and "reward_scale" in state:
            self.reward_scale.load_state(state["reward_scale"])
        if self.constraints is not None and "constraints" in state:
            self.constraints.load_state(state["constraints"])
