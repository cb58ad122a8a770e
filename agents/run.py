"""One place that builds a run: its settings (:class:`TrainConfig`), envs, algorithm, policy, buffer and callbacks.

``textgen train``, ``benchmarks/compare_algorithms.py``, the examples and the rl-zoo3 configs all build through
:func:`build_run` (or, for rl-zoo3, :func:`algorithm_kwargs`), and every default lives once, in
:class:`TrainConfig` and :data:`PRESETS`. A setting changed here changes everywhere.

Example:
    >>> from agents.run import TrainConfig, build_run
    >>> run = build_run(TrainConfig.for_algo("maskable_ppo", total_timesteps=1024))
    >>> before = run.evaluate()
    >>> run.algo.learn(1024, callback=run.callbacks())
    >>> after = run.evaluate()  # the eval env carries the same top-p masks as the training env
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.vec_env import VecEnv

from agents.buffers import EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer
from agents.callbacks import HeldOutEvaluation, ReferenceEMA, SkipFinishedBootstrap, TextMetrics
from agents.constraints import DUAL_STEP, MARGIN_SE, QUANTITIES, Lagrangian, parse_constraints
from agents.evaluate import Evaluation, evaluate
from agents.kl import DEFAULT_BETA, KLPenalty
from text_env.core import resolve_reward
from text_env.extras import require
from text_env.models import DEFAULT_BF16, DEFAULT_MODEL, resolve_model
from text_env.prompts import Example, load_examples
from text_env.rewards import Scorer
from text_env.rewards.composite import reward_terms
from text_env.tasks import Task, get_task
from text_env.vec_env import check_prompt_group, make_text_vec_env

__all__ = [
    "ADVANTAGE_NORMALIZATIONS",
    "ALGORITHMS",
    "BASELINES",
    "PRESETS",
    "REWARD_SCALINGS",
    "Run",
    "TrainConfig",
    "algorithm_class",
    "algorithm_kwargs",
    "base_rewards",
    "build_run",
    "checked_task",
    "make_algorithm",
    "make_env",
    "policy_kwargs",
    "run_task",
]

ALGORITHMS = ("ppo", "a2c", "trpo", "maskable_ppo")  # with the causal-LM policy
BASELINES = ("ppo_bag_of_tokens", "recurrent_ppo_lstm")  # without an LM prior: how much the pretrained LM matters
REWARD_SCALINGS = ("auto", "base-std", "none")  # TrainConfig.reward_scaling, see scales_rewards
ADVANTAGE_NORMALIZATIONS = ("minibatch", "rollout", "none")  # TrainConfig.advantage_normalization

# What differs from TrainConfig's defaults per algorithm. sb3-contrib TRPO runs one double-backward pass through
# the LM per trainable tensor: every weight of SmolLM2 took > 24 GB, LoRA's hundreds of adapters would take hours,
# so it trains the top 2 blocks; its conjugate-gradient and critic loops are cut to PPO's cost per step. Baselines
# learn their embeddings from scratch, hence a larger learning rate; on SB3's own buffers they normalise advantages per
# minibatch (shuffled steps, not whole episodes).
PRESETS: dict[str, dict[str, Any]] = {
    "trpo": {
        "lora_r": 0, "train_layers": 2, "learning_rate": 1e-5,
        "algo_kwargs": {"cg_max_steps": 5, "n_critic_updates": 2},
    },
    "ppo_bag_of_tokens": {"lora_r": 0, "learning_rate": 3e-4, "advantage_normalization": "minibatch"},
    "recurrent_ppo_lstm": {"lora_r": 0, "learning_rate": 3e-4, "advantage_normalization": "minibatch"},
}  # fmt: skip


BF16_HELP = (
    "bfloat16 autocast (weights stay float32); on by default only where bf16 matmuls run natively (GPU, AVX-512 or "
    "AMX CPU): an AVX2-only CPU runs them far slower than float32"
)


def _help(text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field's help text (and allowed values), which ``textgen train --help`` shows (the CLI is derived
    from the fields)."""
    return {"help": text} if choices is None else {"help": text, "choices": choices}


@dataclass
class TrainConfig:
    """Settings of a run; the defaults are ``textgen train``'s (about 13 minutes and 4 GB on a 2-core CPU).

    Each field is also a ``textgen train --<field>`` option (``--no-bf16`` for ``bf16=False``), with the help
    text in its metadata. Use :meth:`for_algo` to start from an algorithm's preset (:data:`PRESETS`).
    """

    task: str = field(default="positive-review", metadata=_help("task name"))
    prompts: str | None = field(
        default=None,
        metadata=_help("train on these prompts (.txt, .jsonl or hf:NAME) instead of the task's train split"),
    )
    reference_column: str | None = field(
        default=None, metadata=_help("the --prompts field (.jsonl, hf:) holding each prompt's reference(s)")
    )
    model: str = field(default=DEFAULT_MODEL, metadata=_help("'default' (embedded SmolLM2), a directory or a hub id"))
    init: str | None = field(
        default=None,
        metadata=_help(
            "start from a textgen sft run: its model is the policy's start and the KL reference (as in InstructGPT)"
        ),
    )
    algo: str = field(default="ppo", metadata=_help("algorithm", ALGORITHMS + BASELINES))
    reward_model: str | None = field(
        default=None, metadata=_help("reward-model directory or 'gold' (default: the task's reward model)")
    )
    reward: str | None = field(
        default=None,
        metadata=_help(
            "a composite reward, a weighted sum such as 'rm + 0.3*gold - 0.01*words' (rm: --reward-model's scorer; "
            "gold; words; the task's own components, e.g. dialogue's chrf and echo), each part logged"
        ),
    )
    reward_aggregate: str | None = field(
        default=None, metadata=_help("an ensemble reward model's aggregation: mean, min or mean_minus_var (mean)")
    )
    reward_lambda: float | None = field(
        default=None, metadata=_help("variance weight of --reward-aggregate mean_minus_var (0.5)")
    )
    total_timesteps: int = field(default=10240, metadata=_help("environment steps (= generated tokens) to train on"))
    n_envs: int = field(default=16, metadata=_help("episodes generated in parallel (the rollout batch)"))
    prompt_group: int = field(
        default=1,
        metadata=_help(
            "envs that answer the same training prompts (it divides n_envs): each episode's reward less the mean of "
            "its group's other answers to that prompt, RLOO's baseline, for a score that depends mostly on the "
            "prompt (1: every env its own prompts, no baseline)"
        ),
    )
    n_steps: int = field(default=32, metadata=_help("steps per env per rollout (a rollout is n_steps * n_envs)"))
    batch_size: int = field(default=128, metadata=_help("minibatch in tokens; whole episodes stay together"))
    n_epochs: int = field(default=4, metadata=_help("PPO epochs per rollout"))
    learning_rate: float = field(default=1e-4, metadata=_help("optimizer step size"))
    gamma: float = field(default=1.0, metadata=_help("discount (1: the reward of a completion counts in full)"))
    beta: float = field(default=DEFAULT_BETA, metadata=_help("KL coefficient (initial value when --target-kl is set)"))
    target_kl: float | None = field(default=None, metadata=_help("adaptive beta toward this KL (nats per episode)"))
    kl_horizon: int | None = field(
        default=None,
        metadata=_help(
            "--target-kl's time constant: episodes over which beta moves by at most a factor e^0.2 (default: a "
            "twentieth of the run's episodes, so beta can move up to 55x within the run)"
        ),
    )
    ent_coef: float = field(default=0.0, metadata=_help("entropy bonus: weight of the policy's entropy in the loss"))
    constraints: list[str] = field(
        default_factory=list,
        metadata={
            **_help(
                "bound a per-episode quantity, NAME<=X or NAME>=X (repeatable), held by a Lagrange multiplier; NAME: "
                + ", ".join(QUANTITIES)
            ),
            "flag": "--constraint",
        },
    )
    constraint_lr: float = field(
        default=DUAL_STEP,
        metadata=_help("the multipliers' dual step per rollout, per unit of violation (0: fixed at --constraint-init)"),
    )
    constraint_init: float = field(default=0.0, metadata=_help("every multiplier's starting value"))
    constraint_margin_se: float = field(
        default=MARGIN_SE,
        metadata=_help(
            "the dual step reads each rollout's mean this many standard errors toward breaking the bound, so that "
            "λ rises while a bound is probably broken, not only when a rollout shows it (0: the plain mean)"
        ),
    )
    advantage_normalization: str = field(
        default="rollout",
        metadata=_help(
            "advantages to mean 0, std 1 once over the whole rollout, per minibatch (SB3's normalize_advantage: a "
            "minibatch holds ~4 episodes), or not at all; rollout gained more gold on the worst of 3 seeds "
            "(benchmarks/results/advantage_normalization.md)",
            ADVANTAGE_NORMALIZATIONS,
        ),
    )
    reward_scaling: str = field(
        default="auto",
        metadata=_help(
            "divide rewards by the (winsorised) std of the base model's rewards, measured once before training, so "
            "that beta is per unit of reward spread; auto: for a gold or other scorer, not for a learned reward model "
            "(train-rm scaled it)",
            REWARD_SCALINGS,
        ),
    )
    reward_scale_prompts: int = field(
        default=64, metadata=_help("training prompts the base model samples to measure the reward scale on")
    )
    max_new_tokens: int | None = field(default=None, metadata=_help("episode length (default: the task's)"))
    max_prompt_tokens: int | None = field(default=None, metadata=_help("room for the prompt (default: the task's)"))
    eval_prompts: int = field(default=80, metadata=_help("held-out prompts evaluated before and after"))
    ref_ema: float = field(
        default=0.0,
        metadata=_help(
            "τ > 0: the KL reference follows the policy as an exponential moving average of its weights, ref <- "
            "(1 - τ) ref + τ W after every update (0: the starting model, fixed); held-out KL is still measured "
            "against the starting model"
        ),
    )
    eval_every: int = field(
        default=0,
        metadata=_help(
            "also evaluate the held-out prompts after every N-th update (0: before and after only): the report's "
            "held_out_history, a held-out curve of gold and KL along training"
        ),
    )
    bf16: bool = field(default=DEFAULT_BF16, metadata=_help(BF16_HELP))
    lora_r: int = field(default=16, metadata=_help("LoRA rank; 0 fine-tunes every weight (or --train-layers)"))
    train_layers: int | None = field(default=None, metadata=_help("with lora_r 0: train only the top N blocks"))
    mask_top_p: float = field(default=0.9, metadata=_help("maskable_ppo: actions outside the reference's top-p"))
    seed: int = field(default=0, metadata=_help("seed of the policy, the sampling and the prompts"))
    out: str = field(default="runs", metadata=_help("directory for runs"))
    tensorboard: bool = field(default=False, metadata=_help("log to <out>/tensorboard"))
    checkpoint_every: int = field(default=5, metadata=_help("save a resumable checkpoint every N rollouts (0: never)"))
    algo_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help("more keyword arguments of the algorithm"))

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS + BASELINES:
            raise ValueError(f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS + BASELINES)}")
        if not 0 <= self.ref_ema <= 1:
            raise ValueError(f"ref_ema is a weight in [0, 1] (0: a fixed reference), got {self.ref_ema}")
        if self.ref_ema and self.algo not in ALGORITHMS:
            raise ValueError(f"ref_ema moves an LM policy's reference; {self.algo} has no LM (use one of {ALGORITHMS})")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: evaluate before and after only), got {self.eval_every}")
        for name in ("total_timesteps", "n_envs", "n_steps", "batch_size", "n_epochs", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_prompt_group(self.n_envs, self.prompt_group)
        if min(self.lora_r, self.checkpoint_every, self.beta, self.ent_coef) < 0 or self.learning_rate <= 0:
            raise ValueError("lora_r, checkpoint_every, beta and ent_coef must be >= 0, and learning_rate > 0")
        if self.init is not None:
            model = Path(self.init) / "model"
            if not (model / "config.json").is_file():
                raise ValueError(f"--init {self.init} is not a finished textgen sft run: it has no model/config.json")
            if self.model not in (DEFAULT_MODEL, str(model)):
                raise ValueError(f"--init sets the model ({model}): drop --model {self.model}")
            self.model = str(model)
        if self.reward_scaling == "running-std":  # config.json of a run before the scale was fixed: resumes fixed
            self.reward_scaling = "base-std"
        parse_constraints(self.constraints, self.max_new_tokens, self.reward_parts)  # one line before any model
        if self.kl_horizon is not None and self.kl_horizon < 1:
            raise ValueError(f"kl_horizon must be at least 1 episode, got {self.kl_horizon}")
        if not self.constraint_lr >= 0 or not self.constraint_init >= 0 or not self.constraint_margin_se >= 0:
            raise ValueError(
                "constraint_lr, constraint_init and constraint_margin_se must be >= 0; got "
                f"{self.constraint_lr}, {self.constraint_init}, {self.constraint_margin_se}"
            )
        if self.reward_scale_prompts < 2:
            raise ValueError(f"reward_scale_prompts must be at least 2, got {self.reward_scale_prompts}")
        if self.advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"advantage_normalization must be one of {', '.join(ADVANTAGE_NORMALIZATIONS)}, "
                f"not {self.advantage_normalization!r}"
            )
        if self.advantage_normalization == "rollout" and self.algo in BASELINES:
            raise ValueError("advantage_normalization='rollout' needs the episode buffer of the LM algorithms")
        if self.reward_scaling not in REWARD_SCALINGS:
            raise ValueError(f"reward_scaling must be one of {', '.join(REWARD_SCALINGS)}, not {self.reward_scaling!r}")
        if self.algo == "trpo" and self.ent_coef:
            raise ValueError("sb3_contrib.TRPO has no entropy bonus: leave ent_coef at 0 with algo='trpo'")
        if self.reference_column is not None and self.prompts is None:
            raise ValueError("reference_column names a field of --prompts: give --prompts (a .jsonl file or hf:NAME)")
        if self.algo == "trpo" and self.lora_r:
            raise ValueError(
                "sb3_contrib.TRPO runs one double-backward pass through the LM per trainable tensor, hundreds with "
                "LoRA: fine-tune the top blocks instead (TrainConfig.for_algo('trpo'), or --lora-r 0 --train-layers 2)"
            )

    @classmethod
    def for_algo(cls, algo: str, **overrides: Any) -> TrainConfig:
        """The defaults, then ``algo``'s preset from :data:`PRESETS`, then ``overrides``."""
        return cls(**{"algo": algo, **PRESETS.get(algo, {}), **overrides})

    @property
    def reward_parts(self) -> tuple[str, ...]:
        """The names of the composite ``reward``'s components (none without one), which a constraint may bound."""
        return tuple(reward_terms(self.reward)) if self.reward is not None else ()

    @property
    def reward_kwargs(self) -> dict[str, Any]:
        """``RewardModel.load``'s keywords from ``reward_aggregate`` / ``reward_lambda`` (those that are set)."""
        return {k: v for k, v in (("aggregate", self.reward_aggregate), ("lam", self.reward_lambda)) if v is not None}

    @property
    def scales_rewards(self) -> bool:
        """Whether the run divides rewards by the spread of the base model's rewards (:class:`agents.kl.RewardScale`):
        ``reward_scaling``, where ``"auto"`` means unless the reward is a learned reward model, which ``train-rm``
        already scaled so that the base policy's samples score std 1 (what β is meant for); a gold scorer, or any
        other, is not scaled."""
        if self.reward_scaling != "auto":
            return self.reward_scaling == "base-std"
        if self.reward is not None:  # a weighted sum has no normalised scale, even of a reward model
            return True
        source = self.reward_model if self.reward_model is not None else get_task(self.task).reward_model
        return source is None or source == "gold"  # anything else names a reward-model directory

    @property
    def lora(self) -> dict[str, Any] | None:
        """The policy's ``lora`` keyword: ``{"r": lora_r}``, or ``None`` without LoRA."""
        return {"r": self.lora_r} if self.lora_r else None


def algorithm_class(algo: str) -> type[BaseAlgorithm]:
    """The SB3 class of an algorithm name in :data:`ALGORITHMS` or :data:`BASELINES`."""
    from sb3_contrib import TRPO, MaskablePPO, RecurrentPPO
    from stable_baselines3 import A2C, PPO

    classes: dict[str, type[BaseAlgorithm]] = {
        "ppo": PPO, "a2c": A2C, "trpo": TRPO, "maskable_ppo": MaskablePPO, "ppo_bag_of_tokens": PPO,
        "recurrent_ppo_lstm": RecurrentPPO,
    }  # fmt: skip
    if algo not in classes:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS + BASELINES)}")
    return classes[algo]


def policy_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The policy's keyword arguments (JSON-able, so ``model.zip`` can rebuild the policy)."""
    from agents.baselines import BagOfTokens, LastTokenEmbedding

    if config.algo == "ppo_bag_of_tokens":
        return {"features_extractor_class": BagOfTokens}
    if config.algo == "recurrent_ppo_lstm":
        return {"features_extractor_class": LastTokenEmbedding}
    kwargs = {"model": config.model, "bf16": config.bf16, "lora": config.lora, "train_layers": config.train_layers}
    return {**kwargs, "reference_ema": config.ref_ema} if config.ref_ema else kwargs


def algorithm_kwargs(config: TrainConfig) -> dict[str, Any]:
    """Everything the algorithm's constructor gets besides the env: policy, buffer and hyperparameters."""
    from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy

    policy: Any = {
        "maskable_ppo": MaskableCausalLMPolicy, "ppo_bag_of_tokens": "MultiInputPolicy",
        "recurrent_ppo_lstm": "MultiInputLstmPolicy",
    }.get(config.algo, CausalLMPolicy)  # fmt: skip
    kwargs: dict[str, Any] = {
        "policy": policy, "policy_kwargs": policy_kwargs(config), "learning_rate": config.learning_rate,
        "gamma": config.gamma, "n_steps": config.n_steps,
    }  # fmt: skip
    if config.algo != "trpo":  # every other algorithm has SB3's entropy bonus
        kwargs["ent_coef"] = config.ent_coef
    if config.algo in ALGORITHMS:  # whole episodes per minibatch: one forward pass per sequence
        kwargs["rollout_buffer_class"] = (
            MaskableEpisodeRolloutBuffer if config.algo == "maskable_ppo" else EpisodeRolloutBuffer
        )
        rollout = config.advantage_normalization == "rollout"
        kwargs["rollout_buffer_kwargs"] = {"normalize_advantage": rollout}
        if config.algo != "a2c" or rollout:  # A2C does not normalise unless asked to; the others per minibatch
            kwargs["normalize_advantage"] = config.advantage_normalization == "minibatch"
    elif config.advantage_normalization == "none":  # the baselines, on SB3's own buffers
        kwargs["normalize_advantage"] = False
    if config.algo != "a2c":  # A2C updates on the whole rollout at once
        kwargs["batch_size"] = config.batch_size
    if config.algo in ("ppo", "maskable_ppo", "ppo_bag_of_tokens", "recurrent_ppo_lstm"):
        kwargs["n_epochs"] = config.n_epochs
    return {**kwargs, **config.algo_kwargs}


def make_algorithm(config: TrainConfig, env: VecEnv, verbose: int = 1) -> BaseAlgorithm:
    """The SB3 algorithm of ``config`` on ``env`` (an env from :func:`make_env`, masks included)."""
    if config.tensorboard:
        require("tensorboard", "--tensorboard")
    kwargs = algorithm_kwargs(config)
    return algorithm_class(config.algo)(
        env=env, seed=config.seed, verbose=verbose,
        tensorboard_log=str(Path(config.out) / "tensorboard") if config.tensorboard else None, **kwargs,
    )  # fmt: skip


def run_task(config: TrainConfig) -> Task:
    """``config.task``, its train split replaced by ``config.prompts`` when given (with references from
    ``config.reference_column``): the one place a run's prompts come from. The task's eval split, gold scorer and
    generation defaults stay, so held-out evaluation is the same with or without one's own prompts."""
    task = get_task(config.task)
    if config.prompts is None:
        return task
    examples = load_examples(config.prompts, reference_column=config.reference_column)
    return replace(task, train_prompts=examples, eval_prompts=task.examples("eval"))


def checked_task(config: TrainConfig) -> Task:
    """:func:`run_task` of ``config`` after the cheap checks (the task, its prompts, the model's name), which say a
    mistake before a reward model or the default model is loaded or fetched."""
    task = run_task(config)
    if config.reward is not None:  # the task's own components are known now
        reward_terms(config.reward, ("rm", "gold", "words", *task.components))
    parse_constraints(config.constraints, config.max_new_tokens or task.max_new_tokens, config.reward_parts)
    if config.model != DEFAULT_MODEL:  # the default is fetched once, when first loaded
        resolve_model(config.model)
    return task


def kl_horizon(config: TrainConfig, task: Task | None = None) -> int:
    """``--target-kl``'s horizon in episodes (:class:`agents.kl.KLController`): ``--kl-horizon``, else a twentieth of
    the episodes the run generates (each at most ``max_new_tokens``), so that β can move up to e^4 = 55x within any
    run. Ziegler et al.'s 10,000 suits runs of 10^5 episodes and more: in a default run (320 episodes) it moved β by
    0.5 % (0.1 to 0.0995), so ``--target-kl`` did nothing (benchmarks/results/constrained.md, adaptive arm)."""
    if config.kl_horizon is not None:
        return config.kl_horizon
    length = config.max_new_tokens or (task or run_task(config)).max_new_tokens
    return max(1, round(config.total_timesteps / length / 20))


def run_reward(config: TrainConfig, task: Task) -> Scorer:
    """The scorer a run's env pays: ``config.reward_model`` (the task's by default), or the composite ``reward``."""
    return resolve_reward(config.reward_model, task, config.reward_kwargs, config.reward)


def make_env(
    config: TrainConfig,
    split: str = "train",
    reward: Scorer | None = None,
    seed: int | None = None,
    task: Task | None = None,
) -> VecEnv:
    """The batched TextGen env of ``config`` on a prompt ``split``, with the top-p masks ``maskable_ppo`` needs.

    :param reward: a scorer already built (e.g. shared by the train and eval envs); default: ``config``'s.
    :param seed: prompt seed (default ``config.seed``).
    :param task: :func:`run_task` of ``config`` already built (its prompts read once for several envs).
    """
    task = task if task is not None else run_task(config)
    env: VecEnv = make_text_vec_env(
        config.n_envs, seed=config.seed if seed is None else seed, split=split, model=config.model, task=task,
        prompt_group=config.prompt_group if split == "train" else 1,  # held-out prompts are each answered once
        reward_model=reward if reward is not None else run_reward(config, task),
        max_new_tokens=config.max_new_tokens, max_prompt_tokens=config.max_prompt_tokens,
    )  # fmt: skip
    if config.algo == "maskable_ppo":  # NLPO-style: actions outside the reference model's top-p are masked
        from agents.masks import TopPMask

        env = TopPMask(env, config.model, top_p=config.mask_top_p, bf16=config.bf16)
    return env


@dataclass
class Run:
    """A built run: what :func:`build_run` returns."""

    config: TrainConfig
    env: VecEnv
    eval_env: VecEnv
    algo: BaseAlgorithm
    kl: KLPenalty
    metrics: TextMetrics
    eval_prompts: list[str | Example]  # records: a reference-based gold scorer needs their references

    def callbacks(self, *more: Any) -> CallbackList:
        """The KL leash, the text metrics and the bootstrap skip (plus ``more``), for ``algo.learn(callback=...)``;
        with ``eval_every``, the held-out evaluation along training."""
        more = (*([ReferenceEMA()] if self.config.ref_ema else []), *more)
        if self.config.eval_every:
            more = (HeldOutEvaluation(self.evaluate, self.metrics, self.config.eval_every), *more)
        return CallbackList([self.kl, self.metrics, SkipFinishedBootstrap(), *more])

    def evaluate(self) -> Evaluation:
        """The policy on the held-out prompts, measured by :func:`agents.evaluate.evaluate` (KL to the starting
        model, the moving reference of ``ref_ema`` aside)."""
        reference = self.config.model if self.config.ref_ema else None
        return evaluate(self.algo.policy, self.eval_env, self.eval_prompts, seed=self.config.seed, reference=reference)


def build_run(config: TrainConfig, verbose: int = 1) -> Run:
    """Build the envs (train and held-out, one reward model shared), the algorithm and the callbacks of ``config``."""
    task = checked_task(config)
    reward = run_reward(config, task)  # one, shared by the train and eval envs
    env = make_env(config, "train", reward, task=task)
    eval_env = make_env(config, "eval", reward, task=task)
    algo = make_algorithm(config, env, verbose)
    constraints = None
    if config.constraints:
        bounds = parse_constraints(config.constraints, components=config.reward_parts)
        constraints = Lagrangian(bounds, config.constraint_lr, config.constraint_init, config.constraint_margin_se)
    kl = KLPenalty(
        config.beta, config.target_kl, kl_horizon(config, task), scale_rewards=config.scales_rewards,
        constraints=constraints, verbose=verbose,
    )  # fmt: skip
    run = Run(config, env, eval_env, algo, kl, TextMetrics(), list(task.examples("eval")[: config.eval_prompts]))
    if config.scales_rewards:  # measured when training starts, unless a checkpoint restores it
        kl.base_rewards = lambda: base_rewards(config, task, reward, algo.policy)
    return run


def base_rewards(config: TrainConfig, task: Task, reward: Scorer, policy: Any = None) -> np.ndarray:
    """The rewards the env pays the base model's samples on the first ``config.reward_scale_prompts`` training
    prompts (one each, seed 0, the global torch RNG left as it was): what :class:`agents.kl.RewardScale` is measured
    on, the same for every seed and every method of a run's settings.

    :param policy: an LM policy that is still the base model (a run's before training: LoRA's adapters start at 0);
        ``None``, or a policy without an LM (the baselines), samples a fresh ``CausalLMPolicy`` of ``config.model``.
    """
    from agents.policies import CausalLMPolicy, _CausalLMMixin

    env = make_env(config, "train", reward, task=task)
    try:
        if not isinstance(policy, _CausalLMMixin):
            policy = CausalLMPolicy(
                env.observation_space, env.action_space, lambda _: 0.0, model=config.model, bf16=config.bf16
            )
        with torch.random.fork_rng(devices=[]):
            prompts = task.examples("train")[: config.reward_scale_prompts]
            return evaluate(policy, env, prompts, seed=0).reward_model_score  # the reward the env pays
    finally:
        env.close()
