"""``textgen inspect``: what RLHF changed, token by token, for the held-out prompts of a saved run.

For each prompt, the base model and the trained policy each write a completion in the run's own env (same prompt
rendering, reward model and gold scorer as training). Every token of both completions gets the trained policy's
log-probability ``log π`` (of its sampling distribution, as PPO and the KL leash use it), the base model's
``log π_ref``, their difference — the per-token KL contribution that :class:`~agents.kl.KLPenalty` charges
``β×`` for —, and the value head's estimate ``V(s_t)`` of the state the token was chosen in; each completion gets
its reward-model and gold score. :func:`inspect_run` returns those arrays (for a notebook), :func:`render_html`
a self-contained page with the tokens coloured by KL, log-prob or value.

Engines: a run is read by the first entry of :data:`ENGINES` whose ``detect`` accepts its directory:
Stable-Baselines3 runs (``model.zip`` + ``config.json``, from ``textgen train`` or ``textgen rlhf``) and RLlib runs
(``checkpoint/`` + ``config.json``, from ``textgen train --engine rllib``). Another engine plugs in with a ``load``
that returns a :class:`LoadedRun` whose ``policy`` follows :class:`InspectablePolicy`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecEnv

from agents.cached_lm import token_log_probs
from agents.run import ALGORITHMS, TrainConfig, algorithm_class, make_env, run_reward, run_task
from text_env.prompts import Example, as_example
from text_env.rewards import Scorer

__all__ = [
    "ENGINES",
    "CompletionTrace",
    "InspectablePolicy",
    "Inspection",
    "LoadedRun",
    "StepTrace",
    "inspect_policy",
    "inspect_run",
    "is_saved_run",
    "load_run",
    "load_run_config",
    "make_inspection_app",
    "render_html",
]

PAGE = Path(__file__).parent / "inspection_page" / "template.html"
METRICS = ("kl", "log_prob", "value")  # what the page can colour tokens by


@dataclass
class StepTrace:
    """One generation step of a batch, each ``(B,)``: the token chosen and what the trained policy makes of it."""

    actions: torch.Tensor
    log_prob: torch.Tensor  # log π(a_t|s_t), trained policy
    ref_log_prob: torch.Tensor  # log π_ref(a_t|s_t), base model
    value: torch.Tensor  # V(s_t), trained value head


class InspectablePolicy(Protocol):
    """What :func:`inspect_policy` needs from a trained policy, whichever engine trained it."""

    device: torch.device  # where observations go

    def step(self, obs: dict[str, torch.Tensor], from_base: bool, action_masks: Any = None) -> StepTrace:
        """Choose the next tokens from the base model (``from_base``) or the trained policy, and score them."""
        ...

    def language_model(self) -> tuple[Any, Any]:
        """The trained LM (a ``transformers`` causal LM, for ``generate``) and its tokenizer."""
        ...


class _LMPolicy:
    """:class:`InspectablePolicy` over a ``CausalLMPolicy`` (or the maskable one), whichever engine trained it (SB3's
    ``model.zip`` holds one; so does RLlib's ``CausalLMRLModule``): its KV caches serve both samplers, one actor and
    one reference pass per step."""

    def __init__(self, policy: Any) -> None:
        self.policy, self.device = policy, policy.device
        policy.set_training_mode(False)

    @torch.no_grad()
    def step(self, obs: dict[str, torch.Tensor], from_base: bool, action_masks: Any = None) -> StepTrace:
        if from_base:  # the base model's own distribution: no temperature, filtering or masks
            ref_logits = self.policy.reference_logits(obs)  # (B, V)
            actions = torch.distributions.Categorical(logits=ref_logits).sample()  # (B,)
            values, log_prob, _ = self.policy.evaluate_actions(obs, actions, **_masks(action_masks))
            ref_log_prob = token_log_probs(ref_logits, actions)
        else:
            actions, values, log_prob = self.policy(obs, **_masks(action_masks))
            ref_log_prob = self.policy.reference_log_prob(obs, actions)
        return StepTrace(actions.reshape(-1), log_prob.reshape(-1), ref_log_prob.reshape(-1), values.reshape(-1))

    def language_model(self) -> tuple[Any, Any]:
        return self.policy.lm, self.policy.tokenizer()


def _masks(action_masks: Any) -> dict[str, Any]:
    return {} if action_masks is None else {"action_masks": action_masks}


@dataclass
class LoadedRun:
    """A saved run, ready to inspect: its policy, the settings it trained with, and where it came from."""

    policy: InspectablePolicy
    config: TrainConfig  # its reward_model is the one the policy was trained on
    engine: str
    checkpoint: Path


def _sb3_detect(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and any(run_dir.glob("**/model.zip"))


def _sb3_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    """A ``textgen train`` run's settings and policy file (``model.zip``, else an interrupted run's
    ``checkpoint/model.zip``), or a ``textgen rlhf`` run's last finished PPO round's (``round-R/checkpoint/model.zip``,
    trained on round R-1's reward model)."""
    record = json.loads((run_dir / "config.json").read_text())
    if "train" in record:  # textgen rlhf
        from agents.rlhf import RLHFConfig

        loop = RLHFConfig(**record)
        rounds = sorted(
            (int(p.parent.parent.name.split("-")[1]), p) for p in run_dir.glob("round-*/checkpoint/model.zip")
        )
        if not rounds:
            raise FileNotFoundError(f"{run_dir} is a textgen rlhf run with no finished PPO round yet")
        r, checkpoint = rounds[-1]
        reward = loop.train.reward_model if r == 1 else str(run_dir / f"round-{r - 1}" / "reward_model")
        return replace(loop.train, reward_model=reward), checkpoint
    config = TrainConfig(**record)
    checkpoint = next((p for p in (run_dir / "model.zip", run_dir / "checkpoint" / "model.zip") if p.is_file()), None)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no model.zip (nor checkpoint/model.zip): the run saved no policy yet")
    return config, checkpoint


def _sb3_load(run_dir: Path) -> LoadedRun:
    config, checkpoint = _sb3_config(run_dir)
    if config.algo not in ALGORITHMS:
        raise ValueError(
            f"{run_dir} trained {config.algo!r}, a policy without a language model: per-token inspection needs an LM "
            f"policy ({', '.join(ALGORITHMS)})"
        )
    policy = algorithm_class(config.algo).load(checkpoint, device="cpu").policy
    return LoadedRun(_LMPolicy(policy), config, "sb3", checkpoint)


def _rllib_record(run_dir: Path) -> dict[str, Any] | None:
    config = run_dir / "config.json"
    record = json.loads(config.read_text()) if config.is_file() else None
    return record if isinstance(record, dict) and record.get("engine") == "rllib" else None


def _rllib_detect(run_dir: Path) -> bool:
    return _rllib_record(run_dir) is not None and (run_dir / "checkpoint").is_dir()


def _rllib_config(run_dir: Path) -> tuple[TrainConfig, Path]:
    record = _rllib_record(run_dir) or {}
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in record.items() if k in names}), run_dir / "checkpoint"


def _rllib_load(run_dir: Path) -> LoadedRun:
    """A ``textgen train --engine rllib`` run: its checkpoint's ``CausalLMRLModule`` wraps a ``CausalLMPolicy``."""
    from agents.rllib import load_rllib_module  # needs Ray: pip install 'textgen-rl[rllib]'

    config, checkpoint = _rllib_config(run_dir)
    return LoadedRun(_LMPolicy(load_rllib_module(checkpoint).policy), config, "rllib", checkpoint)


# name -> (does this directory hold a run of mine?, load it, its settings and checkpoint without loading it)
ENGINES: dict[
    str, tuple[Callable[[Path], bool], Callable[[Path], LoadedRun], Callable[[Path], tuple[TrainConfig, Path]]]
] = {
    "sb3": (_sb3_detect, _sb3_load, _sb3_config),
    "rllib": (_rllib_detect, _rllib_load, _rllib_config),
}


def is_saved_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a run directory some engine of :data:`ENGINES` can load (not, e.g., a model directory)."""
    return Path(path).is_dir() and any(detect(Path(path)) for detect, _, _ in ENGINES.values())


def load_run(run_dir: str | os.PathLike[str]) -> LoadedRun:
    """Load a saved run with the first engine of :data:`ENGINES` that recognises its directory."""
    return _engine_of(Path(run_dir))[1](Path(run_dir))


def load_run_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """A saved run's settings (its reward model the one its policy trained on), read without loading the policy."""
    return _engine_of(Path(run_dir))[2](Path(run_dir))[0]


def _engine_of(run_dir: Path) -> tuple[Any, ...]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    for engine in ENGINES.values():
        if engine[0](run_dir):
            return engine
    raise FileNotFoundError(
        f"{run_dir} is not a saved run: expected config.json and a model.zip (textgen train, textgen rlhf) or "
        "checkpoint/ (textgen train --engine rllib); "
        f"engines known: {', '.join(ENGINES)}"
    )


@dataclass
class CompletionTrace:
    """One completion with its per-token arrays, each of shape ``(T,)`` for its ``T`` generated tokens."""

    prompt: str
    completion: str
    tokens: list[str]  # the text each token adds (they concatenate to the completion, special tokens shown)
    token_ids: np.ndarray
    log_prob: np.ndarray  # log π(a_t|s_t) of the trained policy, nats
    ref_log_prob: np.ndarray  # log π_ref(a_t|s_t) of the base model, nats
    kl: np.ndarray  # log π - log π_ref: the token's term of the KL estimate, nats
    value: np.ndarray  # V(s_t): the trained value head's estimate before choosing token t
    reward_model_score: float
    gold_score: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: arrays as lists."""
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items()}


@dataclass
class Inspection:
    """Base and trained completions of the same prompts (``base[i]`` and ``trained[i]`` share ``prompts[i]``)."""

    prompts: list[str]
    base: list[CompletionTrace]
    trained: list[CompletionTrace]
    meta: dict[str, Any] = field(default_factory=dict)  # run directory, engine, algorithm, reward model, task

    def summary(self) -> dict[str, dict[str, float]]:
        """Per model: mean reward-model score, gold score and KL per completion (nats)."""
        return {
            name: {
                "reward_model_score": float(np.mean([t.reward_model_score for t in traces])),
                "gold_score": float(np.mean([t.gold_score for t in traces])),
                "kl": float(np.mean([t.kl.sum() for t in traces])),
            }
            for name, traces in (("base", self.base), ("trained", self.trained))
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta, "summary": self.summary(), "prompts": self.prompts,
            "base": [t.to_dict() for t in self.base], "trained": [t.to_dict() for t in self.trained],
        }  # fmt: skip


def _token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoding prefixes: a character split over several byte tokens lands on the last."""
    pieces, before = [], ""
    for t in range(len(ids)):
        text = tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=False)
        if text.endswith("\ufffd") and t < len(ids) - 1:  # an unfinished character shows with the token ending it
            pieces.append("")
            continue
        pieces.append(text[len(before) :] if text.startswith(before) else text)
        before = text
    return pieces


@torch.no_grad()
def inspect_policy(
    policy: InspectablePolicy, env: VecEnv, prompts: Sequence[str | Example], seed: int = 0
) -> tuple[list[CompletionTrace], list[CompletionTrace]]:
    """Base-model and trained-policy completions of ``prompts`` in ``env``, with their per-token arrays.

    :param env: a TextGen ``VecEnv`` (``env.num_envs`` prompts at a time); with ``action_masks()`` the trained
        policy samples and is scored under them, as it was trained.
    :param seed: seeds the sampling; the base model samples from the same seed as the policy.
    :return: ``(base, trained)``, one :class:`CompletionTrace` per prompt each.
    """
    if not prompts:
        raise ValueError("inspect_policy needs at least one prompt")
    tokenizer = env.get_attr("tokenizer")[0]
    results: dict[bool, list[CompletionTrace]] = {True: [], False: []}
    n = env.num_envs
    for from_base in (True, False):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), n):
            chunk = list(prompts[start : start + n])
            env.set_options([{"prompt": chunk[i % len(chunk)]} for i in range(n)])
            obs = env.reset()
            live = np.ones(n, dtype=bool)
            steps: list[StepTrace] = []
            infos: list[dict[str, Any] | None] = [None] * n
            lengths = np.zeros(n, dtype=np.int64)
            while live.any():
                masks = env.action_masks() if hasattr(env, "action_masks") else None  # type: ignore[attr-defined]
                trace = policy.step(obs_as_tensor(obs, policy.device), from_base, masks)  # type: ignore[arg-type]
                steps.append(trace)
                lengths += live
                obs, _, dones, step_infos = env.step(trace.actions.cpu().numpy())
                for i in np.flatnonzero(dones & live):
                    infos[i], live[i] = step_infos[i], False
            stacked = {
                k: torch.stack([getattr(s, k) for s in steps], dim=1).float().cpu().numpy()  # (n, T_max)
                for k in ("log_prob", "ref_log_prob", "value")
            }
            actions = torch.stack([s.actions for s in steps], dim=1).cpu().numpy()  # (n, T_max)
            for i in range(len(chunk)):
                info, t = infos[i], int(lengths[i])
                assert info is not None
                log_prob, ref, ids = stacked["log_prob"][i, :t], stacked["ref_log_prob"][i, :t], actions[i, :t].copy()
                trace = CompletionTrace(
                    as_example(chunk[i]).prompt, info["completion"], _token_pieces(tokenizer, ids), ids, log_prob, ref,
                    log_prob - ref, stacked["value"][i, :t], float(info["reward_model_score"]),
                    float(info["gold_score"]),
                )  # fmt: skip
                results[from_base].append(trace)
    return results[True], results[False]


def inspect_run(
    run_dir: str | os.PathLike[str],
    n_prompts: int = 8,
    prompts: Sequence[str | Example] | None = None,
    split: str = "eval",
    seed: int = 0,
    reward: Scorer | None = None,
) -> Inspection:
    """Per-token view of a saved run: base and trained completions of its task's held-out prompts.

    :param run_dir: the run directory (``textgen train``'s or ``textgen rlhf``'s).
    :param n_prompts: how many prompts of ``split``, from the first (the run's own evaluation order).
    :param prompts: these prompts instead.
    :param reward: the scorer of the ``reward_model_score`` (default: the reward model the policy trained on).

    Example:
        >>> from agents.inspection import inspect_run
        >>> view = inspect_run("runs/positive-review-ppo-20261201-120000", n_prompts=4)
        >>> view.trained[0].tokens, view.trained[0].kl  # plot them: plt.bar(range(len(kl)), kl)
    """
    loaded = load_run(run_dir)
    config = loaded.config
    task = run_task(config)
    # records, not bare texts: a reference-based gold scorer needs each prompt's references
    chosen = list(prompts) if prompts is not None else task.examples(split)[:n_prompts]
    if not chosen:
        raise ValueError("no prompts to inspect: n_prompts must be at least 1")
    scorer = reward if reward is not None else run_reward(config, task)
    env = make_env(replace(config, n_envs=min(len(chosen), 8)), split, scorer, seed=seed)
    try:
        base, trained = inspect_policy(loaded.policy, env, chosen, seed)
    finally:
        env.close()
    meta = {
        "run_dir": str(run_dir), "engine": loaded.engine, "checkpoint": str(loaded.checkpoint), "algo": config.algo,
        "task": config.task, "model": config.model, "reward_model": config.reward_model or task.reward_model or "gold",
        "split": split, "seed": seed,
    }  # fmt: skip
    return Inspection([as_example(p).prompt for p in chosen], base, trained, meta)


def render_html(inspection: Inspection, title: str | None = None) -> str:
    """A self-contained HTML page (no outside resources) of ``inspection``: coloured tokens, switchable metric."""
    from agents.train import json_safe

    data = json.dumps(json_safe(inspection.to_dict()), ensure_ascii=False, allow_nan=False)
    data = data.replace("<", "\\u003c")  # nothing in the data can close the <script> it sits in
    page = PAGE.read_text(encoding="utf-8")
    title = title or f"What RLHF changed: {Path(inspection.meta.get('run_dir', 'run')).name}"
    escaped = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return page.replace("{{TITLE}}", escaped).replace("{{DATA}}", data)


def make_inspection_app(inspection: Inspection, token: str | None = None) -> Any:
    """The FastAPI app of ``textgen inspect --port``: ``GET /`` the page, ``GET /api/inspection`` its data (JSON)."""
    from agents.web import check_web_stack

    check_web_stack()
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from agents.train import json_safe
    from agents.web import require_token

    app = FastAPI(title="TextGen inspection", docs_url=None, redoc_url=None, openapi_url=None)
    require_token(app, token)
    page = render_html(inspection)
    record = json_safe(inspection.to_dict())

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/inspection")
    def data() -> dict[str, Any]:
        return record

    return app
