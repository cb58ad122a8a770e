"""The iterated RLHF loop: PPO, fresh preference pairs from the policy, a refitted reward model, and again.

A reward model fitted on the base model's samples judges text it has never seen once PPO moves away from them, and
PPO learns to please it rather than the judge it stands for (over-optimisation: the proxy score rises while the gold
falls). InstructGPT's answer is to iterate steps 2 and 3: every round (1) continues PPO from the current policy under
the latest reward model, the KL leash staying on the **base** model; (2) samples two completions per *training*
prompt from the policy; (3) has the annotator label them; (4) refits the reward model on every pair so far. Round 0
is the task's reward model. Each refit is a head on frozen backbone features, whose features are computed once per
completion and kept, so a refit costs the new completions' features and an L-BFGS fit (``refit.seconds``).

The run directory (``<out>/rlhf-<task>-<time>/``) gets every artefact before the next step starts::

    config.json              the RLHFConfig
    round-0/report.json      the base policy on the held-out prompts, under the round-0 reward model
    round-R/checkpoint/      the policy after round R's PPO (``model.zip`` loads with ``PPO.load``), optimiser, β, RNG
    round-R/eval.json        that policy on the held-out prompts
    round-R/pairs.jsonl      round R's labelled pairs, one line appended and flushed per label
    round-R/reward_model/    the refit (``RewardModel.load``) and its report.json
    round-R/report.json      the round's report; it marks the round finished
    checkpoint/              mid-PPO checkpoint (every ``checkpoint_every`` rollouts, Ctrl-C, SIGTERM)
    report.json, report.md, rlhf.png   at the end

``rlhf(resume=RUN_DIR)`` (``textgen rlhf --resume``) continues at the first artefact missing: PPO from the mid-round
checkpoint (or the previous round's), labelling after the pairs already in ``pairs.jsonl`` (counted, never asked
again), the refit from all pairs on disk. Every round, interrupted or not, starts from the previous round's saved
checkpoint in a freshly built run, so a resumed run follows the same code path as an uninterrupted one.

Example:
    >>> from agents.rlhf import LOOP_BETA, RLHFConfig, rlhf
    >>> from agents.run import TrainConfig
    >>> train = TrainConfig(seed=1, beta=LOOP_BETA)
    >>> report = rlhf(RLHFConfig(train, rounds=4, tokens_per_round=10240, pairs_per_round=256))
    >>> [r["eval"]["gold_score"] for r in report["rounds"]]  # round 0 (the base policy), then after each round
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.run import Run, TrainConfig, build_run, checked_task, run_reward
from agents.train import (
    CHECKPOINT,
    Interrupted,
    cpu_kind,
    evaluation_record,
    json_safe,
    learn_with_checkpoints,
    new_run_dir,
    peak_rss_gb,
    pyplot,
    replace_directory,
    restore_checkpoint,
    resumable_config,
    save_checkpoint,
    set_aside_report,
)
from text_env.rewards import Scorer
from text_env.rewards.annotators import HumanAnnotator, SimulatedAnnotator
from text_env.rewards.preferences import PreferencePair, drop_torn_last_line, generate_pairs, load_preferences
from text_env.rewards.reward_model import RewardModel, RewardModelConfig
from text_env.rewards.training import CachedHeads, FeatureCache, evaluate_reward_model, train_reward_model

__all__ = ["ANNOTATORS", "LOOP_ALGORITHMS", "LOOP_BETA", "RLHFConfig", "markdown", "plot", "rlhf"]

ANNOTATORS = ("simulated", "human")
# The loop samples each round's pairs with the policy's own LM (``generate``): that needs an LM policy without the
# top-p masks of maskable_ppo, which generate would not apply.
LOOP_ALGORITHMS = ("ppo", "a2c", "trpo")
COMMAND = "textgen rlhf"
# The loop's KL coefficient, looser than textgen train's DEFAULT_BETA (0.1): the refits, not the leash, keep its reward
# model honest. Measured over 3 seeds (2 rounds of 5,120 tokens, benchmarks/results/rlhf_loop*.md): β 0.05 ends at
# mean gold 0.728, worst 0.673 (KL <= 11.6); β 0.1 at 0.554, worst 0.482, below one-shot textgen train's 0.570.
LOOP_BETA = 0.05


@dataclass
class RLHFConfig:
    """Settings of the iterated loop: PPO's (a :class:`~agents.run.TrainConfig`) and the loop's own.

    Every field but ``train`` is also a ``textgen rlhf --<field>`` option, beside TrainConfig's. ``train``'s
    ``total_timesteps`` is not used: each round trains ``tokens_per_round`` more steps. ``train.reward_model`` is
    the round-0 reward model (``None``: the task's); later rounds use the loop's refits. ``train`` defaults to
    TrainConfig's defaults but β = :data:`LOOP_BETA`; a TrainConfig of one's own keeps its own β (pass
    ``beta=LOOP_BETA`` for the loop's).
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(beta=LOOP_BETA), metadata={"help": "PPO's settings"})
    rounds: int = field(default=4, metadata={"help": "rounds of PPO, then fresh pairs and a reward-model refit"})
    tokens_per_round: int = field(default=10240, metadata={"help": "PPO environment steps (tokens) per round"})
    pairs_per_round: int = field(
        default=256, metadata={"help": "pairs sampled from the current policy and labelled per round"}
    )
    annotator: str = field(
        default="simulated",
        metadata={"help": "a Bradley-Terry simulated human on the task's gold, or you", "choices": ANNOTATORS},
    )
    annotator_beta: float = field(default=10.0, metadata={"help": "label sharpness of the simulated annotator"})
    base_pairs: str | None = field(
        default=None,
        metadata={
            "help": "JSONL pairs the round-0 reward model was fitted on, kept in every refit (default: prefs.jsonl "
            "beside it if there is one; 'none': no such pairs)"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):  # read back from config.json
            self.train = TrainConfig(**self.train)
        for name in ("rounds", "tokens_per_round", "pairs_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.annotator not in ANNOTATORS:
            raise ValueError(f"annotator must be one of {', '.join(ANNOTATORS)}, not {self.annotator!r}")
        if not self.annotator_beta >= 0:
            raise ValueError(f"annotator_beta must be >= 0, got {self.annotator_beta}")
        if self.train.algo not in LOOP_ALGORITHMS:
            raise ValueError(
                f"the loop samples its preference pairs with the policy's LM, which algo {self.train.algo!r} does not "
                f"have or would mask: choose one of {', '.join(LOOP_ALGORITHMS)}"
            )


def rlhf(
    config: RLHFConfig | None = None, resume: str | Path | None = None, verbose: int = 1, rounds: int | None = None
) -> dict[str, Any]:
    """Run the loop (see the module docstring), save every round in the run directory; return the report.

    :param config: the loop's settings (ignored with ``resume``, whose ``config.json`` is used).
    :param resume: the run directory of an interrupted loop: continue it at its first missing artefact.
    :param verbose: SB3's verbosity during PPO.
    :param rounds: with ``resume``, run the loop on to this many rounds, above its own: extends a finished loop as
        well as an interrupted one (each new round starts from the last round's saved policy and reward model).
    :return: ``report.json``'s content: ``rounds`` holds round 0 (the base policy) and every round's report.
    :raises Interrupted: on Ctrl-C or SIGTERM (or the end of a human annotator's input), after saving.
    """
    if rounds is not None and resume is None:
        raise ValueError("rounds extends a loop given by resume; a new loop takes it in its RLHFConfig")
    if resume is not None:
        run_dir = Path(resume)
        record = resumable_config(run_dir, COMMAND, extend=None if rounds is None else ("rounds", rounds))
        if "rounds" not in record:
            raise ValueError(f"{run_dir} is a textgen train run: continue it with textgen train --resume {run_dir}")
        config = RLHFConfig(**record)
        loop = _Loop(config, verbose)
        if rounds is not None:
            set_aside_report(run_dir, "rounds")
            (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    else:
        config = config or RLHFConfig()
        loop = _Loop(config, verbose)  # checks the reward model and the pairs before a directory is made
        run_dir = new_run_dir(config.train.out, f"rlhf-{config.train.task}")
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    with _sigterm_stops():
        try:
            return loop.run(run_dir)
        except (KeyboardInterrupt, EOFError):  # EOF: a human annotator's input ended; every label so far is saved
            raise Interrupted(run_dir, loop.timesteps, COMMAND) from None


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM stops the loop as Ctrl-C does: with saved state, not mid-write. (During PPO the checkpointer of
    :func:`agents.train.learn_with_checkpoints` takes both signals over and saves a checkpoint.)"""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Loop:
    """The loop's state: the task, the round-0 reward model, the refit settings, the feature cache."""

    def __init__(self, config: RLHFConfig, verbose: int) -> None:
        self.config, self.verbose = config, verbose
        self.task = checked_task(config.train)  # --prompts, when given, are where the pairs come from too
        self.timesteps = 0  # PPO steps saved so far (for the message of an interruption)
        source = config.train.reward_model or self.task.reward_model
        self.round0 = run_reward(config.train, self.task)
        # Refits are head-mode reward models on the round-0 model's backbone and features (layer, pooling, ensemble
        # size); with a gold (or scorer) round 0, one head on the policy's own LM's last hidden states.
        if isinstance(self.round0, RewardModel):
            self.rm_config = replace(self.round0.config, mode="head")
        else:
            self.rm_config = RewardModelConfig(backbone=config.train.model)
        base = config.base_pairs
        if base is None and isinstance(self.round0, RewardModel) and source is not None:
            beside = Path(source) / "prefs.jsonl"
            base = str(beside) if beside.is_file() else None
        self.base_pairs = [] if base in (None, "none") else load_preferences(base)
        if len(self.base_pairs) + config.pairs_per_round < 4:
            raise ValueError(
                f"a refit needs at least 4 pairs, and round 1 has {config.pairs_per_round} with "
                f"{len(self.base_pairs)} base pairs: raise pairs_per_round or give base_pairs"
            )
        self.features: FeatureCache | None = None  # built at the first refit (it loads the backbone)

    # --- the loop ------------------------------------------------------------------------------------------------
    def run(self, run_dir: Path) -> dict[str, Any]:
        self.run_dir = run_dir
        for r in range(1, self.config.rounds + 1):
            self._round(r)
            gc.collect()  # the round's run (policy, optimiser, envs) goes before the next one is built
        rounds = [json.loads((self._dir(r) / "report.json").read_text()) for r in range(self.config.rounds + 1)]
        return self._finish(rounds)

    def _dir(self, r: int) -> Path:
        return self.run_dir / f"round-{r}"

    def _reward_model(self, r: int) -> str | None:
        """The reward model of round ``r + 1``'s PPO: round ``r``'s refit, or for r = 0 the configured one."""
        return self.config.train.reward_model if r == 0 else str(self._dir(r) / "reward_model")

    def _round(self, r: int) -> None:
        """PPO, held-out evaluation, fresh pairs, refit, report: each step skipped when its artefact exists."""
        d, c = self._dir(r), self.config
        if (d / "report.json").is_file():
            return
        d.mkdir(exist_ok=True)
        config = replace(c.train, reward_model=self._reward_model(r - 1), total_timesteps=r * c.tokens_per_round)
        torch.manual_seed(c.train.seed)
        run = build_run(config, self.verbose)
        if r == 1 and not (self._dir(0) / "report.json").is_file():
            self._dir(0).mkdir(exist_ok=True)
            before = evaluation_record(run.evaluate())
            report0 = {"round": 0, "timesteps": 0, "reward_model": self._name(0), "eval": before["summary"]}
            _write_json(self._dir(0) / "report.json", {**report0, "samples": _samples(before)})
            torch.manual_seed(c.train.seed)  # PPO starts alike whether round 0 was evaluated now or read back

        state = self._ppo(run, r)
        if (d / "eval.json").is_file():
            evaluation = json.loads((d / "eval.json").read_text())
        else:
            started = time.time()
            evaluation = evaluation_record(run.evaluate())
            _write_json(d / "eval.json", {**evaluation, "seconds": time.time() - started})
        pairs, label_seconds = self._label(run, r)
        refit = self._refit(r, pairs)
        history = [h for h in state["history"] if (r - 1) * c.tokens_per_round < h["timesteps"]]
        report = {
            "round": r, "timesteps": r * c.tokens_per_round, "reward_model": self._name(r - 1),
            "eval": evaluation["summary"], "samples": _samples(evaluation), "history": history,
            "pairs": {"new": len(pairs), "seconds": label_seconds},
            "previous_reward_model_on_fresh_pairs": refit.pop("previous_on_fresh_pairs"), "refit": refit,
            "ppo_seconds_total": state["train_seconds"], "final_beta": state["beta"], "peak_rss_gb": peak_rss_gb(),
        }  # fmt: skip
        _write_json(d / "report.json", report)
        if self.verbose:
            print(_round_line(report), flush=True)

    def _name(self, r: int) -> str:
        """How a report names round ``r + 1``'s reward model (run-relative for refits)."""
        if r:
            return f"round-{r}/reward_model"
        return self.config.train.reward_model or self.task.reward_model or "gold"

    def _ppo(self, run: Run, r: int) -> dict[str, Any]:
        """Round ``r``'s PPO, from the mid-round checkpoint or the previous round's; saved in ``round-r/checkpoint``."""
        d, previous = self._dir(r), (r - 1) * self.config.tokens_per_round
        state = restore_checkpoint(run, d)  # PPO of this round already finished
        if not state:
            state = restore_checkpoint(run, self.run_dir)  # interrupted in this round's PPO
            if state.get("num_timesteps", 0) <= previous:  # none, or one left from an earlier round
                state = restore_checkpoint(run, self._dir(r - 1)) if r > 1 else {}
            state.setdefault("train_seconds", 0.0)
            state["peak_rss_gb"] = max(state.get("peak_rss_gb", 0.0), peak_rss_gb())
            learn_with_checkpoints(run, self.run_dir, state, COMMAND)
            save_checkpoint(run, d, run.algo.num_timesteps, state)
            shutil.rmtree(self.run_dir / CHECKPOINT, ignore_errors=True)  # round-r/checkpoint supersedes it
            state = json.loads((d / CHECKPOINT / "state.json").read_text())  # the record as saved: history, β
        self.timesteps = state["num_timesteps"]
        return state

    def _label(self, run: Run, r: int) -> tuple[list[PreferencePair], float]:
        """Round ``r``'s pairs: two samples per training prompt from the policy, labelled and appended one by one."""
        path, c = self._dir(r) / "pairs.jsonl", self.config
        if (self._dir(r) / "reward_model").is_dir():  # labelling finished (a human may have skipped some pairs)
            return load_preferences(path), 0.0
        drop_torn_last_line(path)  # a line cut by a hard kill: that one label is lost, the file stays readable
        done = len(load_preferences(path)) if path.is_file() and path.stat().st_size else 0
        seed = _seed(c.train.seed, r)
        annotator = (
            HumanAnnotator() if c.annotator == "human"
            else SimulatedAnnotator(self.task.gold, c.annotator_beta, seed=_seed(seed, done))
        )  # fmt: skip
        policy = run.algo.policy
        policy.set_training_mode(False)
        started = time.time()
        pairs = generate_pairs(
            policy.lm, policy.tokenizer(), self.task.examples("train"), annotator, path, c.pairs_per_round,
            instruction=self.task.instruction, max_new_tokens=run.env.get_attr("max_new_tokens")[0], seed=seed,
        )  # fmt: skip
        return pairs, time.time() - started

    def _refit(self, r: int, fresh: list[PreferencePair]) -> dict[str, Any]:
        """Refit on every pair so far with ``train_reward_model`` (its split, fit, output scale and test report) on
        cached features; also measure round ``r - 1``'s reward model on the fresh pairs, which it never saw."""
        out = self._dir(r) / "reward_model"
        if (out / "report.json").is_file():
            return json.loads((out / "report.json").read_text())
        if self.features is None:
            self.features = FeatureCache(RewardModel(self.rm_config))
            if self.base_pairs:  # the same in every run on this task: read back from the user's cache after the first
                self.features.preload(self.base_pairs, progress=self.verbose > 0)
        previous = evaluate_reward_model(self._scorer(r - 1), fresh, self.task.gold)
        pairs = self.base_pairs + [p for k in range(1, r + 1) for p in load_preferences(self._dir(k) / "pairs.jsonl")]
        if len(pairs) < 4:
            raise ValueError(f"a refit needs at least 4 pairs, round {r} has {len(pairs)} (too many skipped?)")
        # The output scale makes the train split's completions (the base model's and every round's policy samples)
        # score mean 0, std 1, so that β keeps its meaning from round to round.
        model, report = train_reward_model(
            pairs, self.rm_config, self.task.gold, seed=self.config.train.seed, progress=False, features=self.features
        )
        record = {
            **asdict(report), "n_pairs": len(pairs), "n_base_pairs": len(self.base_pairs),
            "previous_on_fresh_pairs": asdict(previous),
        }  # fmt: skip

        def write(new: Path) -> None:  # complete before it takes the final name
            model.save(new)
            _write_json(new / "report.json", record)

        replace_directory(out, write)
        return json.loads((out / "report.json").read_text())

    def _scorer(self, r: int) -> Scorer:
        """Round ``r + 1``'s reward model as a scorer (on cached features when it is a head on the same ones)."""
        assert self.features is not None
        kwargs = self.config.train.reward_kwargs
        model = self.round0 if r == 0 else RewardModel.load(self._dir(r) / "reward_model", **kwargs)
        if isinstance(model, RewardModel) and model.config == self.rm_config:
            return CachedHeads(model, self.features)
        return model

    def _finish(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        last = rounds[-1]
        report = {
            "config": asdict(self.config), "rounds": rounds, "run_dir": str(self.run_dir),
            "ppo_seconds": last["ppo_seconds_total"],
            "label_seconds": sum(r["pairs"]["seconds"] for r in rounds[1:]),
            "refit_seconds": sum(r["refit"]["seconds"] for r in rounds[1:]),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rounds[1:]),
            "machine": f"{cpu_kind()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        }  # fmt: skip
        table = markdown(rounds)
        _write_json(self.run_dir / "report.json", report)
        (self.run_dir / "report.md").write_text(table + "\n")
        plot(rounds, self.run_dir / "rlhf.png")
        print(table)
        print(f"\nsaved to {self.run_dir} (last policy: {self._dir(self.config.rounds) / CHECKPOINT / 'model.zip'})")
        return report


# --- records ---------------------------------------------------------------------------------------------------


def _seed(*keys: int) -> int:
    """A seed derived from several integers (run seed, round, labels done) without collisions between them."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _samples(evaluation: dict[str, Any], n: int = 3) -> list[dict[str, str]]:
    pairs = zip(evaluation["prompts"][:n], evaluation["completions"][:n], strict=True)
    return [{"prompt": p, "completion": c} for p, c in pairs]


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write atomically: a reader (or a resume) sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(record), indent=1, allow_nan=False))
    tmp.replace(path)


def _round_line(report: dict[str, Any]) -> str:
    e, prev, refit = report["eval"], report["previous_reward_model_on_fresh_pairs"], report["refit"]
    return (
        f"round {report['round']}: held-out gold {e['gold_score']:.3f}, reward model {e['reward_model_score']:.3f}, "
        f"KL {e['kl']:.2f}; the round's reward model on its {prev['n_heldout']} fresh pairs: accuracy "
        f"{_fmt(prev['accuracy'])} (labels), {_fmt(prev['gold_accuracy'])} (gold); refit on {refit['n_pairs']} pairs "
        f"in {refit['seconds']:.1f} s, test accuracy {_fmt(refit['accuracy'])}"
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(rounds: list[dict[str, Any]]) -> str:
    """One row per round: the held-out evaluation, the previous reward model on the fresh pairs, the refit."""
    lines = [
        "| round | reward model | gold | reward-model score | KL | distinct-2 | its accuracy on the round's fresh "
        "pairs (labels / gold) | refit: pairs, test accuracy (labels / gold), seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rounds:
        e = r["eval"]
        prev, refit = r.get("previous_reward_model_on_fresh_pairs"), r.get("refit")
        judged = f"{_fmt(prev['accuracy'])} / {_fmt(prev['gold_accuracy'])} ({prev['n_heldout']})" if prev else ""
        fitted = (
            f"{refit['n_pairs']}, {_fmt(refit['accuracy'])} / {_fmt(refit['gold_accuracy'])}, {refit['seconds']:.1f}"
            if refit else ""
        )  # fmt: skip
        lines.append(
            f"| {r['round']} | {r['reward_model']} | {e['gold_score']:.3f} | {e['reward_model_score']:.3f} | "
            f"{e['kl']:.2f} | {e['distinct_2']:.3f} | {judged} | {fitted} |"
        )
    return "\n".join(lines)


def plot(rounds: list[dict[str, Any]], path: Path) -> None:
    """Gold and proxy (reward-model) score against √KL to the base model over the whole run (Gao et al. 2022's axes):
    lines per training rollout, coloured by round; markers for the held-out evaluation after each round."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rounds:
        color = f"C{r['round'] % 10}"
        rows = [h for h in r.get("history", []) if "kl" in h]
        x = [math.sqrt(max(h["kl"], 0.0)) for h in rows]
        ax.plot(x, [h["gold_score"] for h in rows], "-", color=color, alpha=0.6, lw=1)
        ax.plot(x, [h["reward_model_score"] for h in rows], "--", color=color, alpha=0.6, lw=1)
        e, xe = r["eval"], math.sqrt(max(r["eval"]["kl"], 0.0))
        ax.plot([xe], [e["gold_score"]], "o", color=color, ms=8)
        ax.plot([xe], [e["reward_model_score"]], "s", color=color, ms=8, mfc="none")
        ax.annotate(f"r{r['round']}", (xe, e["gold_score"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    handles = [
        plt.Line2D([], [], color="k", ls="-", label="gold, training rollouts"),
        plt.Line2D([], [], color="k", ls="--", label="reward model of the round, training rollouts"),
        plt.Line2D([], [], color="k", marker="o", ls="", label="gold, held-out after round r"),
        plt.Line2D([], [], color="k", marker="s", mfc="none", ls="", label="reward model, held-out after round r"),
    ]
    ax.legend(handles=handles, fontsize=8)
    ax.set_xlabel("√KL to the base model (KL in nats per completion)")
    ax.set_ylabel("score")
    ax.set_title("gold and proxy score against √KL; colour: round", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
