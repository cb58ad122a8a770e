"""``textgen train --engine rllib``: the run of a :class:`~agents.run.TrainConfig`, trained by RLlib's PPO.

:func:`rllib_config` maps the config onto RLlib's own idiom (``PPOConfig().environment(...).env_runners(...)
.learners(...).rl_module(...)``), so a user can start from it and change anything RLlib offers; :func:`train_rllib`
connects to Ray, evaluates the policy on the held-out prompts before and after (the SB3 path's
:func:`agents.evaluate.evaluate`, on the module's own :class:`~agents.policies.CausalLMPolicy`), trains to the token
budget, checkpoints with ``save_to_path`` and writes the same report as ``textgen train``; :func:`export_rllib`
writes a checkpoint's LM with ``save_pretrained``.

Each EnvRunner makes its own envs, reward model included, from ``env_config`` (plain settings: names, paths,
numbers), so no model is ever pickled across processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gymnasium as gym
import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModule, RLModuleSpec
from ray.rllib.env.env_context import EnvContext
from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED
from ray.tune.registry import register_env

from agents.constraints import Lagrangian, episode_quantities, parse_constraints
from agents.evaluate import evaluate
from agents.kl import KLController, RewardScale
from agents.policies import export_pretrained
from agents.rllib.learner import CONSTRAINTS, KL_BETA, QUANTITIES_KEY, REWARD_SCALE, RLHFPPOLearner
from agents.rllib.module import REF_LOGP, CausalLMRLModule
from agents.run import TrainConfig, base_rewards, checked_task, kl_horizon, make_env, run_task
from agents.train import (
    before_after_table,
    completed_directory,
    constraints_table,
    cpu_kind,
    evaluation_record,
    new_run_dir,
    paired_samples,
    peak_rss_gb,
    plot_training,
    replace_directory,
    resumable_config,
)
from text_env.core import resolve_reward
from text_env.tasks import get_task

__all__ = [
    "RLHFMetrics",
    "connect_ray",
    "export_rllib",
    "load_rllib_module",
    "make_rllib_env",
    "rllib_config",
    "train_rllib",
]

ENV_ID = "text_env:TextGen-v0"  # the module prefix makes every EnvRunner process import text_env (registration)
KL_TARGET, KL_HORIZON = "kl_target", "kl_horizon"  # learner_config_dict keys read by RLHFMetrics (KL_BETA: β at first)
GAE_LAMBDA = 0.95  # SB3 PPO's gae_lambda, which the SB3 path uses
CLIP_RANGE = 0.2  # SB3 PPO's clip_range
VF_COEF = 0.5  # SB3 PPO's vf_coef
MAX_GRAD_NORM = 0.5  # SB3 PPO's max_grad_norm
SAMPLE_TIMEOUT_S = 1800.0  # RLlib drops an EnvRunner's late samples (its default, 60 s, is one CPU rollout of SmolLM2)
ENVS_PER_RUNNER = "envs_per_runner"  # env_config keys read by make_rllib_env
COMPOSITE = "composite_reward"
RLLIB_ENV_ID = "textgen-rllib"  # make_rllib_env in Ray's env registry, which EnvRunners on every node read
_COMPONENT_SUM = "rlhf_component_sum/"  # + a composite reward's component name
_SUMS = ("rlhf_reward_model_score_sum", "rlhf_gold_score_sum", "rlhf_kl_sum", "rlhf_tokens", "rlhf_episodes")


class _SeedOffset(gym.Wrapper):
    """Shifts the seed of every seeded reset by ``offset``."""

    def __init__(self, env: gym.Env, offset: int) -> None:
        super().__init__(env)
        self.offset = offset

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return self.env.reset(seed=None if seed is None else seed + self.offset, options=options)


def make_rllib_env(context: EnvContext) -> gym.Env:
    """One TextGen env of an EnvRunner, from its ``env_config``.

    RLlib seeds EnvRunner ``w``'s ``k`` envs with ``seed + w + i`` (``i < k``), so two runners' prompt streams
    overlap (runner 1: 1..8, runner 2: 2..9): 7 of 16 envs drew another env's prompts. Shifting runner ``w``'s seeds
    by ``(w - 1)(k - 1) - 1`` gives ``seed + (w - 1)k + i``: ``n_envs`` distinct streams, env ``i`` of the SB3 path's
    ``seed + i`` among them. The driver's own envs (``worker_index`` 0) are left as RLlib seeds them.
    """
    settings = dict(context)
    per_runner = settings.pop(ENVS_PER_RUNNER, 1)
    settings.pop("num_envs", None)  # RLlib's hint for vectorised creators; these are made one at a time
    composite = settings.pop(COMPOSITE, None)
    if composite is not None:  # --reward "rm + 0.3*gold": built here, in the EnvRunner, from names
        task = get_task(settings["task"])
        settings["reward_model"] = resolve_reward(
            settings["reward_model"], task, settings.pop("reward_kwargs", None), composite
        )
    env = gym.make(ENV_ID, **settings)
    if not context.worker_index:
        return env
    return _SeedOffset(env, (context.worker_index - 1) * (per_runner - 1) - 1)


register_env(RLLIB_ENV_ID, make_rllib_env)


def rllib_config(
    config: TrainConfig,
    num_env_runners: int = 1,
    num_learners: int = 0,
    num_gpus_per_learner: float = 0,
) -> PPOConfig:
    """RLlib's ``PPOConfig`` of a :class:`~agents.run.TrainConfig`: same env, LM policy, KL leash and PPO settings.

    ``n_envs`` envs are spread over the EnvRunners (``ceil(n_envs / runners)`` each), a rollout of
    ``n_envs * n_steps`` tokens is one training iteration (split over the Learners), minibatches of about
    ``batch_size`` tokens are whole episodes reshuffled each epoch, as SB3's (one LM pass per episode); the rest is
    SB3 PPO's defaults (GAE λ 0.95, clip 0.2, value coefficient 0.5, no value clipping, gradient norm 0.5).

    :param num_env_runners: sampling processes (0: sample in the driver).
    :param num_learners: training processes (0: train in the driver); more than one trains data-parallel.
    :param num_gpus_per_learner: GPUs per Learner (fractions share one).
    """
    if config.algo != "ppo":
        raise ValueError(f"the RLlib engine trains PPO only (RLlib's PPO on the LM RLModule), not {config.algo!r}")
    if num_env_runners < 0 or num_learners < 0 or num_gpus_per_learner < 0:
        raise ValueError(
            "num_env_runners, num_learners and num_gpus_per_learner must be >= 0, got "
            f"{num_env_runners}, {num_learners}, {num_gpus_per_learner}"
        )
    if num_gpus_per_learner and not num_learners and not torch.cuda.is_available():
        raise ValueError(
            f"--num-gpus-per-learner {num_gpus_per_learner} with the Learner in this process (--num-learners 0) needs "
            f"a CUDA GPU here, and torch {torch.__version__} sees none: leave it at 0 to train on the CPU, or give "
            "--num-learners N to place N GPU Learners on the cluster's GPU nodes"
        )
    if config.prompt_group > 1:
        raise ValueError("--prompt-group runs on --engine sb3 only so far: RLlib's EnvRunners draw their own prompts")
    if config.ref_ema:
        raise ValueError("--ref-ema runs on --engine sb3 only so far: the RLlib module's reference is fixed")
    task = run_task(config)
    env_config = {
        "model": config.model, "task": config.task, "reward_model": config.reward_model,
        "reward_kwargs": config.reward_kwargs or None, "max_new_tokens": config.max_new_tokens,
        "max_prompt_tokens": config.max_prompt_tokens, "split": "train",
        "prompts": task.examples("train") if config.prompts else None,  # plain records, not a model
        ENVS_PER_RUNNER: math.ceil(config.n_envs / max(1, num_env_runners)), COMPOSITE: config.reward,
    }  # fmt: skip
    train_batch = max(1, config.n_envs * config.n_steps // max(1, num_learners))  # tokens per Learner per iteration
    constraints = None
    if config.constraints:  # the Learner's KLRewardPenalty owns the multipliers (agents.constraints.Lagrangian)
        constraints = {
            "specs": list(config.constraints), "lr": config.constraint_lr, "init": config.constraint_init,
            "margin_se": config.constraint_margin_se, "components": list(config.reward_parts),
        }  # fmt: skip
    model_config = {
        "model": config.model,
        "bf16": config.bf16,
        "lora": config.lora,
        "train_layers": config.train_layers,
    }
    return (
        PPOConfig()
        .environment(RLLIB_ENV_ID, env_config=env_config)
        .env_runners(
            num_env_runners=num_env_runners,
            num_envs_per_env_runner=env_config[ENVS_PER_RUNNER],
            sample_timeout_s=SAMPLE_TIMEOUT_S,
        )
        .learners(
            num_learners=num_learners,
            num_gpus_per_learner=num_gpus_per_learner,
            num_aggregator_actors_per_learner=0,  # the KL penalty runs in the Learner's own connector pipeline
            learner_class=RLHFPPOLearner,
            learner_config_dict={
                KL_BETA: config.beta,
                KL_TARGET: config.target_kl,
                KL_HORIZON: kl_horizon(config, task),
                REWARD_SCALE: 1.0,  # train_rllib sets the measured one when the run scales its rewards
                CONSTRAINTS: constraints,
            },
        )
        .training(
            lr=config.learning_rate,
            gamma=config.gamma,
            lambda_=GAE_LAMBDA,
            train_batch_size_per_learner=train_batch,
            minibatch_size=min(config.batch_size, train_batch),  # as SB3: a minibatch is at most the rollout
            num_epochs=config.n_epochs,
            shuffle_batch_per_epoch=False,  # RLHFPPOLearner shuffles whole episodes itself (EpisodeMinibatches)
            clip_param=CLIP_RANGE,
            vf_loss_coeff=VF_COEF,
            vf_clip_param=float("inf"),
            entropy_coeff=config.ent_coef,
            use_kl_loss=False,  # the RLHF KL is in the reward (and the behaviour logits are not shipped)
            grad_clip=MAX_GRAD_NORM,
            grad_clip_by="global_norm",
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=CausalLMRLModule, model_config=model_config))
        .callbacks(RLHFMetrics)
        .debugging(seed=config.seed)
    )


def _on_learners(algorithm: Algorithm, func: Callable[[RLHFPPOLearner], Any]) -> list[Any]:
    """``func(learner)`` on every Learner (local or remote), raising what any of them raised."""
    return [result.get() for result in algorithm.learner_group.foreach_learner(func)]


class RLHFMetrics(RLlibCallback):
    """Per iteration, what ``textgen train`` logs per rollout, and the adaptive β.

    EnvRunners sum, over the episodes that ended, the reward-model score, the gold score and the KL to the reference
    (``log π − log π_ref`` over every token of the episode, earlier chunks included); the driver turns the sums into
    means in ``result["rlhf"]`` (``reward_model_score``, ``gold_score``, ``kl_per_episode``, ``kl_per_token``,
    ``beta``, ``episodes``), then moves β with :class:`agents.kl.KLController` and hands it to every Learner.
    """

    def on_algorithm_init(self, *, algorithm: Algorithm, **kwargs: Any) -> None:
        settings = algorithm.config.learner_config_dict
        self.controller = KLController(settings[KL_BETA], settings.get(KL_TARGET), settings[KL_HORIZON])

    def on_episode_end(
        self, *, episode: Any, prev_episode_chunks: Any = None, metrics_logger: Any, **kwargs: Any
    ) -> None:
        info = episode.get_infos(-1)
        components = info.get("reward_components", {})  # a composite reward's parts
        kls, refs, actions = [], [], []
        chunks = [*(prev_episode_chunks or []), episode]
        for chunk, following in zip(chunks, [*chunks[1:], None], strict=True):
            # A chunk's own steps end where the next one starts: a chunk sampled in this process (num_env_runners=0)
            # is the object the Learner later extends by GAE's bootstrap step, which would count twice.
            own = len(chunk) if following is None else following.t_started - chunk.t_started
            logp = np.asarray(chunk.get_extra_model_outputs(Columns.ACTION_LOGP), dtype=np.float64)[:own]  # (T,)
            ref = np.asarray(chunk.get_extra_model_outputs(REF_LOGP), dtype=np.float64)[:own]  # (T,)
            kls.append(logp - ref)
            refs.append(ref)
            actions.extend(int(a) for a in np.asarray(chunk.get_actions())[:own])
        kl = np.concatenate(kls)  # (T,) the whole episode's, earlier chunks included
        # what a constraint may bound, measured over the whole episode; the Learner charges it at the last token
        quantities = episode_quantities(kl, np.concatenate(refs), actions)
        episode.custom_data[QUANTITIES_KEY] = {**quantities, **components}
        values = (info["reward_model_score"], info["gold_score"], float(kl.sum()), kl.size, 1)
        for key, value in zip(_SUMS, values, strict=True):
            metrics_logger.log_value(key, value, reduce="sum")
        for name, score in components.items():  # each logged
            metrics_logger.log_value(f"{_COMPONENT_SUM}{name}", float(score), reduce="sum")

    def on_train_result(self, *, algorithm: Algorithm, result: dict, **kwargs: Any) -> None:
        runners = result.get(ENV_RUNNER_RESULTS, {})
        # an iteration in which no episode ended (they span iterations when max_new_tokens > n_steps) logged no sums:
        # RLlib reports them as NaN, or not at all
        rm, gold, kl, tokens, episodes = (float(np.nan_to_num(runners.get(key, 0.0))) for key in _SUMS)
        row: dict[str, float] = {"beta": self.controller.beta, "episodes": episodes}  # β applied in this iteration
        if episodes:
            row.update(
                reward_model_score=rm / episodes, gold_score=gold / episodes, kl_per_episode=kl / episodes,
                kl_per_token=kl / max(1.0, tokens),
            )  # fmt: skip
            for key, value in runners.items():  # reward/<component>, as textgen train logs them
                if key.startswith(_COMPONENT_SUM):
                    row[f"reward/{key.removeprefix(_COMPONENT_SUM)}"] = float(value) / episodes
            beta = self.controller.update(row["kl_per_episode"], int(episodes))
            _on_learners(algorithm, lambda learner, beta=beta: learner.set_kl_beta(beta))
        if algorithm.config.learner_config_dict.get(CONSTRAINTS) and algorithm.config.num_learners > 1:
            _share_multipliers(algorithm)
        learned = result.get("learners", {}).get(DEFAULT_MODULE_ID, {})  # the multipliers' dual step, if any
        row.update({key: float(value) for key, value in learned.items() if key.startswith("constraint/")})
        result["rlhf"] = row


def _share_multipliers(algorithm: Algorithm) -> None:
    """Several Learners each took λ's dual step on their own share of the episodes: all go on from the mean of their
    λ (and of their units, each measured on its first share), which is the step on the mean violation when the
    shares are equal, so that every Learner charges the same prices."""
    states = _on_learners(algorithm, lambda learner: learner.constraint_state())
    merged = {**states[0], "lambdas": np.mean([s["lambdas"] for s in states], 0).tolist()}
    units = [s["units"] for s in states if s["units"] is not None]
    merged["units"] = np.mean(units, 0).tolist() if units else None
    _on_learners(algorithm, lambda learner: learner.load_constraint_state(merged))


def connect_ray(address: str | None = None, num_cpus: int | None = None, timeout: float = 5.0) -> bool:
    """Start a local Ray or join a cluster; fail within ``timeout`` seconds when the cluster does not answer.

    :param address: ``None`` (then ``$RAY_ADDRESS``; unset: a local Ray on this machine), ``"local"``, ``"auto"``
        (the cluster this machine belongs to), ``"HOST:PORT"`` (a head node's GCS) or ``"ray://HOST:PORT"`` (Ray
        Client).
    :param num_cpus: CPUs of a local Ray (default: all); ignored on a cluster.
    :return: whether this call started Ray (and so should shut it down).
    :raises ConnectionError: when nothing answers at ``address``.
    """
    if ray.is_initialized():
        return False
    address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        return True
    if address != "auto":  # Ray itself retries an unreachable GCS for a minute or more: probe the port first
        parts = urlsplit(address if "://" in address else f"gcs://{address}")
        try:
            if parts.hostname is None or parts.port is None:
                raise ValueError("expected HOST:PORT")
            socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
        except (OSError, ValueError) as err:
            raise ConnectionError(
                f"no Ray cluster answers at RAY_ADDRESS={address!r} ({err}): start one with `ray start --head` "
                "and pass its address, or unset RAY_ADDRESS to train on a local Ray on this machine"
            ) from None
    try:
        ray.init(address=address)
    except ConnectionError as err:
        raise ConnectionError(
            f"could not join the Ray cluster at {address!r}: {err}. Start one with `ray start --head`, or unset "
            "RAY_ADDRESS to train on a local Ray on this machine"
        ) from None
    return True


def _module_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """The RLModule directory inside an algorithm checkpoint, a ``train_rllib`` run directory (its ``checkpoint/``)
    or ``checkpoint`` itself when it is one."""
    path = Path(checkpoint)
    if (path / "checkpoint").is_dir():  # a run directory of train_rllib
        path = path / "checkpoint"
    inner = path / COMPONENT_LEARNER_GROUP / COMPONENT_LEARNER / COMPONENT_RL_MODULE / DEFAULT_MODULE_ID
    if inner.is_dir():
        return inner
    if (path / "module_state.pkl").is_file() or (path / "class_and_ctor_args.pkl").is_file():
        return path
    raise FileNotFoundError(
        f"{path} is not an RLlib checkpoint of the LM module: expected {inner} (from algo.save_to_path), a "
        "textgen train --engine rllib run directory or an RLModule directory"
    )


def load_rllib_module(checkpoint: str | os.PathLike[str]) -> CausalLMRLModule:
    """The trained :class:`CausalLMRLModule` of an algorithm checkpoint (``algo.save_to_path()``'s directory) or of
    a :func:`train_rllib` run directory."""
    module = RLModule.from_checkpoint(_module_dir(checkpoint))
    if not isinstance(module, CausalLMRLModule):
        raise TypeError(f"{checkpoint} holds a {type(module).__name__}, not TextGen's CausalLMRLModule")
    return module


STATE_FILE = "textgen_state.json"
"""Beside RLlib's own files in a run's ``checkpoint/``: the history, tokens, seconds, EnvRunner restarts and reward
scale so far, what ``--resume`` continues from."""


def _shown(row: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "timesteps")


def _save(algo: Algorithm, checkpoint: Path, state: dict[str, Any]) -> dict[str, Any]:
    """RLlib's checkpoint of ``algo`` and the run's state beside it, the state written last (its presence marks a
    complete checkpoint), replacing the last one whole (:func:`replace_directory`); return that state. It holds β
    and the multipliers too: they live in the Learners' connector, whose state RLlib does not save."""
    beta, constraints = _on_learners(algo, lambda learner: (learner.kl_beta(), learner.constraint_state()))[0]
    state = {**state, "beta": beta, "constraints": constraints}

    def write(new: Path) -> None:
        algo.save_to_path(str(new))
        (new / STATE_FILE).write_text(json.dumps(state, indent=1))

    replace_directory(checkpoint, write)
    return state


def _restore_learner_state(algo: Algorithm, state: dict[str, Any]) -> None:
    """Put :func:`_save`'s β and multipliers back into the Learners and the driver's β controller."""
    if "beta" in state:
        beta = float(state["beta"])
        _on_learners(algo, lambda learner: learner.set_kl_beta(beta))
        callbacks = algo.callbacks if isinstance(algo.callbacks, list) else [algo.callbacks]
        for callback in callbacks:
            if isinstance(callback, RLHFMetrics):
                callback.controller.beta = beta
    if state.get("constraints"):
        _on_learners(algo, lambda learner: learner.load_constraint_state(state["constraints"]))


def export_rllib(checkpoint: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint's fine-tuned LM (LoRA merged) and tokenizer with ``save_pretrained``, as
    :func:`agents.policies.export_pretrained` does for a ``model.zip``; loads in ``transformers.pipeline``."""
    return export_pretrained(load_rllib_module(checkpoint).policy, path)


def train_rllib(
    config: TrainConfig | None = None,
    num_env_runners: int = 1,
    num_learners: int = 0,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus_per_learner: float = 0,
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train ``config`` with RLlib's PPO; evaluate on held-out prompts before and after; save the run; return the
    report (``textgen train``'s fields plus ``tokens_per_second``, ``checkpoint`` and the Ray settings).

    The run directory ``<out>/<task>-rllib-ppo-<time>/`` gets ``config.json``, ``before.json``, ``checkpoint/``
    (``Algorithm.from_checkpoint`` / :func:`export_rllib`; written every ``checkpoint_every`` iterations with
    ``checkpoint/textgen_state.json``, the history so far), ``report.json``, ``report.md`` and ``training.png``.
    A lost EnvRunner (its process or node killed) is restarted by RLlib's own fault tolerance and the run goes on;
    the report counts the restarts and the episodes they lost. A lost driver is resumed from the last checkpoint.

    :param address: the Ray cluster (see :func:`connect_ray`); ``None``: ``$RAY_ADDRESS`` or a local Ray.
    :param num_cpus: CPUs of a local Ray (default: all of this machine's).
    :param resume: an interrupted run directory to continue from its last checkpoint (its settings come from there:
        leave the others at their defaults).
    """
    run_dir = Path(resume) if resume is not None else None
    state: dict[str, Any] = {"history": [], "sampled": 0, "seconds": 0.0, "restarts": 0}
    if run_dir is not None:
        record = resumable_config(run_dir, "textgen train --engine rllib")
        if record.get("engine") != "rllib":
            raise ValueError(f"{run_dir} is not an --engine rllib run: resume it with textgen train --resume")
        num_env_runners, num_learners = record.pop("num_env_runners"), record.pop("num_learners")
        num_gpus_per_learner = record.pop("num_gpus_per_learner", 0)
        record.pop("engine")
        config = TrainConfig(**record)
        saved = completed_directory(run_dir / "checkpoint", STATE_FILE) / STATE_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet: start the run again")
        state = json.loads(saved.read_text())
    config = config or TrainConfig()
    algo_config = rllib_config(config, num_env_runners, num_learners, num_gpus_per_learner)  # checks before Ray
    torch.manual_seed(config.seed)
    task = checked_task(config)
    reward = resolve_reward(config.reward_model, task, config.reward_kwargs)
    eval_env = make_env(config, "eval", reward, task=task)
    prompts = list(task.examples("eval")[: config.eval_prompts])  # records: a reference-based gold needs them
    engine = {
        "engine": "rllib", "num_env_runners": num_env_runners, "num_learners": num_learners,
        "num_gpus_per_learner": num_gpus_per_learner,
    }  # fmt: skip
    started_ray = connect_ray(address, num_cpus)  # before the run directory: a cluster short of GPUs leaves none
    try:
        gpus_needed, gpus = num_learners * num_gpus_per_learner, ray.cluster_resources().get("GPU", 0)
        if gpus_needed > gpus:
            raise ValueError(
                f"{num_learners} Learners x {num_gpus_per_learner} GPUs need {gpus_needed:g} GPUs, and the Ray "
                f"cluster has {gpus:g}: add GPU nodes (ray start --address ... --num-gpus N) or leave "
                "--num-gpus-per-learner at 0"
            )
        spec = algo_config.rl_module_spec

        def driver_module() -> CausalLMRLModule:  # the LM in this process, to evaluate (trainable tensors set later)
            return CausalLMRLModule(
                observation_space=eval_env.observation_space, action_space=eval_env.action_space,
                model_config=spec.model_config,
            )  # fmt: skip

        held_out: CausalLMRLModule | None = None  # with eval_every: the driver's copy of the Learner's weights
        if run_dir is None:
            start = driver_module()
            if config.scales_rewards:  # one divisor for every Learner, measured on the base model's samples first
                state["reward_scale"] = RewardScale().measure(base_rewards(config, task, reward, start.policy))
            run_dir = new_run_dir(config.out, f"{config.task}-rllib-ppo")  # the settings, data and model loaded
            (run_dir / "config.json").write_text(json.dumps({**asdict(config), **engine}, indent=1))
            before = evaluation_record(evaluate(start.policy, eval_env, prompts, seed=config.seed))
            (run_dir / "before.json").write_text(json.dumps(before, indent=1))
            held_out = start if config.eval_every else None
            del start
        else:
            before = json.loads((run_dir / "before.json").read_text())
        if state.get("reward_scale") is not None:
            algo_config.learners(
                learner_config_dict={**algo_config.learner_config_dict, REWARD_SCALE: state["reward_scale"]}
            )
        checkpoint = (run_dir / "checkpoint").resolve()
        algo = algo_config.build_algo()
        if resume is not None:
            algo.restore_from_path(str(checkpoint))  # weights and optimiser: what the last checkpoint held
            _restore_learner_state(algo, state)  # β and the multipliers, saved beside it
            print(f"resumed {run_dir} at {state['sampled']} tokens", flush=True)
        history: list[dict[str, float]] = state["history"]
        sampled, seconds = int(state["sampled"]), float(state["seconds"])
        restarts_before, failures = int(state["restarts"]), int(state.get("failures", 0))
        healthy = num_env_runners
        while sampled < config.total_timesteps:
            tic = time.perf_counter()
            result = algo.train()
            seconds += time.perf_counter() - tic
            sampled += int(result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED])  # this iteration's (a resume's too)
            row = {"timesteps": float(sampled), **result["rlhf"]}
            if "kl_per_episode" in row:
                row["kl"] = row["kl_per_episode"]  # the key textgen train's history uses
            history.append(row)
            if config.eval_every and len(history) % config.eval_every == 0 and sampled < config.total_timesteps:
                held_out = held_out or driver_module()  # the last update's is the report's "after"
                held_out.set_state(_on_learners(algo, lambda learner: learner.module[DEFAULT_MODULE_ID].get_state())[0])
                tic = time.perf_counter()
                with torch.random.fork_rng(devices=[]):
                    summary = evaluate(held_out.policy, eval_env, prompts, seed=config.seed).summary
                summary = {**summary, "train_seconds": seconds, "eval_seconds": time.perf_counter() - tic}
                state.setdefault("held_out", []).append({"timesteps": float(sampled), **summary})
                print(f"held-out after iteration {len(history)}: " + _shown(summary), flush=True)
            print(
                f"iteration {len(history)}: {sampled} tokens, {sampled / seconds:.1f} tokens/s, {_shown(row)}",
                flush=True,
            )
            # RLlib takes a lost EnvRunner out of service and samples on with the others while Ray restarts it
            now_healthy = algo.env_runner_group.num_healthy_remote_workers()
            failures += max(0, healthy - now_healthy)
            healthy = now_healthy
            restarts = restarts_before + algo.env_runner_group.num_remote_worker_restarts()
            failures = max(failures, restarts)  # one lost and back within an iteration shows as a restart only
            state = {**state, "history": history, "sampled": sampled, "seconds": seconds, "restarts": restarts,
                     "failures": failures}  # fmt: skip
            if config.checkpoint_every and len(history) % config.checkpoint_every == 0:
                state = _save(algo, checkpoint, state)
        state = _save(algo, checkpoint, state)
        final_beta = float(state["beta"])
        nodes = {  # where the work ran: on a cluster, the EnvRunners' nodes are not the driver's
            "driver": ray.get_runtime_context().get_node_id(),
            "env_runners": algo.env_runner_group.foreach_env_runner(
                lambda runner: ray.get_runtime_context().get_node_id(), local_env_runner=False
            ),
        }
        algo.stop()
    finally:
        if started_ray:
            ray.shutdown()
    lost = int(state.get("failures", 0))
    faults = {  # a lost EnvRunner loses the episodes in flight on its envs; what it sampled before was sent
        "env_runners_lost": lost,
        "env_runner_restarts": int(state["restarts"]),
        "episodes_lost_at_most": lost * algo_config.num_envs_per_env_runner,
    }

    trained = load_rllib_module(checkpoint)
    final = evaluate(trained.policy, eval_env, prompts, seed=config.seed)
    after = evaluation_record(final)
    constraints = None
    if state.get("constraints"):  # the Learner's multipliers, summarised as textgen train's report does
        lagrangian = Lagrangian(parse_constraints(config.constraints, components=config.reward_parts))
        lagrangian.load_state(state["constraints"])
        constraints = lagrangian.summary(final.quantities)
    table = before_after_table(before, after) + constraints_table(constraints)
    report = {
        "config": asdict(config), **engine, "before": before["summary"], "after": after["summary"],
        "train_seconds": seconds, "tokens": sampled, "tokens_per_second": sampled / seconds, "history": history,
        "held_out_history": state.get("held_out", []),
        "final_beta": final_beta, "constraints": constraints, "peak_rss_gb": peak_rss_gb(), "nodes": nodes,
        "faults": faults,
        "resumed": resume is not None,
        "final_reward_scale": algo_config.learner_config_dict[REWARD_SCALE] if config.scales_rewards else None,
        "machine": f"{cpu_kind()}, torch {torch.__version__}, ray {ray.__version__}", "checkpoint": str(checkpoint),
        "samples": paired_samples(before, after),
        "run_dir": str(run_dir),
    }  # fmt: skip
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(table + "\n")
    plot_training(history, run_dir / "training.png", eval_env.get_attr("gold")[0], state.get("held_out", []))
    print(table)
    print(f"\nsaved to {run_dir} (export with: textgen export {checkpoint} OUT_DIR)")
    return report
