"""The main job: RLHF fine-tuning of an LM on a task, evaluated before and after, resumable after an interruption.

A run directory is made before anything else and holds, as they become known: ``config.json``, ``before.json``
(the evaluation before training), ``checkpoint/`` (every ``checkpoint_every`` rollouts and on SIGINT/SIGTERM:
the algorithm with its optimiser state, β, the metrics so far, the RNG state), and at the end ``model.zip``,
``report.json``, ``report.md`` and ``training.png``. ``train(resume=RUN_DIR)`` (``textgen train --resume``)
continues from the checkpoint to the same total number of steps; episodes in flight at the interruption are
started again, and the report covers the whole run.
"""

from __future__ import annotations

import json
import math
import platform
import random
import re
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.constraints import Constraint
from agents.evaluate import Evaluation
from agents.run import ALGORITHMS, BASELINES, Run, TrainConfig, algorithm_class, build_run, make_algorithm
from text_env.rewards import scorer_name

__all__ = [
    "ALGORITHMS", "BASELINES", "Interrupted", "TrainConfig", "algorithm_class", "before_after_table",
    "completed_directory", "cpu_kind", "evaluation_record", "json_safe", "learn_with_checkpoints", "make_algorithm",
    "new_run_dir", "paired_samples", "peak_rss_gb", "plot_training", "pyplot", "replace_directory",
    "restore_checkpoint", "resumable_config", "save_checkpoint", "set_aside_report", "status_gb", "train",
]  # fmt: skip

CHECKPOINT = "checkpoint"


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``run_dir`` resumes it.

    :param command: the command whose ``--resume`` continues the run (``textgen rlhf`` for the iterated loop).
    """

    def __init__(self, run_dir: Path, timesteps: int, command: str = "textgen train") -> None:
        super().__init__(
            f"interrupted at {timesteps} steps; checkpoint saved. Continue with: {command} --resume {run_dir}"
        )
        self.run_dir, self.timesteps = run_dir, timesteps


class _Checkpointer(BaseCallback):
    """Saves the run at rollout boundaries (after an update, before the next rollout) every ``every`` rollouts,
    and stops training cleanly on SIGINT/SIGTERM: the rollout in progress is dropped, the last boundary saved.

    A boundary is the only point where the weights, the optimiser and β agree with ``num_timesteps``: SB3 counts
    steps as they are collected, but updates only after the rollout.
    """

    def __init__(self, run: Run, run_dir: Path, every: int, state: dict[str, Any]) -> None:
        super().__init__()
        self.run, self.run_dir, self.every, self.state = run, run_dir, every, state
        self.stop_requested = False
        self.boundary = 0
        self.started = time.time()
        self._rollouts = 0
        self._saved_at = -1
        self._previous: dict[int, Any] = {}

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now, without waiting for the step to finish
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping (again to quit at once)", flush=True)

    def _on_training_start(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request_stop)

    def _on_rollout_start(self) -> None:
        self.boundary = self.num_timesteps
        if self._rollouts and self.every and self._rollouts % self.every == 0:
            self.save()
        self._rollouts += 1

    def _on_step(self) -> bool:
        return not self.stop_requested

    def _on_training_end(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def save(self) -> None:
        if self._saved_at != self.boundary:
            seconds = self.state["train_seconds"] + time.time() - self.started
            peak = max(self.state["peak_rss_gb"], peak_rss_gb())
            record = {**self.state, "train_seconds": seconds, "peak_rss_gb": peak}
            save_checkpoint(self.run, self.run_dir, self.boundary, record)
            self._saved_at = self.boundary


def save_checkpoint(run: Run, run_dir: Path, timesteps: int, state: dict[str, Any]) -> None:
    """Write ``run_dir/checkpoint`` (:func:`replace_directory`): the weights, optimiser, RNG and run state."""

    def write(new: Path) -> None:
        run.algo.save(new / "model.zip")  # weights and optimiser state
        torch.save({"torch": torch.get_rng_state()}, new / "rng.pt")
        record = {
            **state, "num_timesteps": timesteps, "n_updates": int(getattr(run.algo, "_n_updates", 0)),
            **run.kl.state(), "history": run.metrics.history, "held_out": run.metrics.held_out,
            "numpy_rng": _np_state(), "python_rng": repr(random.getstate()),
        }  # fmt: skip
        (new / "state.json").write_text(json.dumps(record, indent=1))  # written last: it marks a complete one

    replace_directory(run_dir / CHECKPOINT, write)


def replace_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Fill ``<target>.new`` with ``write``, then swap it in by renames alone: ``target`` moves aside to ``.old``,
    ``.new`` takes its name, and only then is ``.old`` deleted. A process killed at any point leaves one complete
    checkpoint: ``target`` while writing or deleting (a checkpoint saved over in place was lost with it; one deleted
    in place could be left half gone with its marker still there), ``.new`` between the two renames, which
    :func:`completed_directory` puts in place."""
    new, old = (target.with_name(f"{target.name}.{suffix}") for suffix in ("new", "old"))
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    shutil.rmtree(old, ignore_errors=True)  # a leftover of a save killed while deleting it
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def completed_directory(target: Path, marker: str) -> Path:
    """``target``, first completed from :func:`replace_directory`'s ``<target>.new`` when the process died between
    moving the old one aside and renaming the new one (``marker``: the file written last, whose presence marks a
    whole one)."""
    new = target.with_name(f"{target.name}.new")
    if not (target / marker).is_file() and (new / marker).is_file():
        shutil.rmtree(target, ignore_errors=True)
        new.rename(target)
    return target


def _np_state() -> list[Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, gauss]


def restore_checkpoint(run: Run, run_dir: Path) -> dict[str, Any]:
    """Load ``run_dir``'s checkpoint into ``run``; return its state record (``{}`` when there is none)."""
    path = completed_directory(run_dir / CHECKPOINT, "state.json")
    if not (path / "state.json").is_file():
        return {}
    state = json.loads((path / "state.json").read_text())
    weights = path / "model.zip" if (path / "model.zip").is_file() else run_dir / "model.zip"  # a finished run's
    run.algo.set_parameters(str(weights), exact_match=True, device=run.algo.device)
    run.algo.num_timesteps = state["num_timesteps"]
    if hasattr(run.algo, "_n_updates"):
        run.algo._n_updates = state["n_updates"]
    run.kl.load_state(state)
    run.metrics.history = state["history"]
    run.metrics.held_out = state.get("held_out", [])
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    run.env.seed(run.config.seed + state["num_timesteps"])  # fresh prompts, not a replay of the first rollouts
    return state


def set_aside_report(run_dir: Path, budget: str) -> None:
    """A finished run that is extended is in progress again: its ``report.json`` and ``report.md`` are renamed after
    the ``budget`` they reached (``report.10240-total-timesteps.json``, ``report.2-rounds.md``), so that an
    interrupted extension resumes like any other run and no report is lost. Call it before ``config.json`` is
    rewritten with the new budget."""
    report = run_dir / "report.json"
    if not report.is_file():
        return
    reached = json.loads((run_dir / "config.json").read_text())[budget]
    for suffix in (".json", ".md"):
        if report.with_suffix(suffix).is_file():
            report.with_suffix(suffix).replace(run_dir / f"report.{reached}-{budget.replace('_', '-')}{suffix}")


def resumable_config(
    run_dir: Path, command: str = "textgen train", extend: tuple[str, int] | None = None
) -> dict[str, Any]:
    """The ``config.json`` record of a run directory to resume; raise if it has none, or if the run has finished and
    is not extended.

    :param extend: ``(field, value)``: the run's budget (``total_timesteps``, or the loop's ``rounds``) raised to
        ``value``, which must be above the run's; a finished run then goes on.
    """
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a {command} run directory: it has no config.json")
    record = json.loads((run_dir / "config.json").read_text())
    if extend is None:
        if (run_dir / "report.json").is_file():
            raise ValueError(f"{run_dir} already finished (report.json exists): nothing to resume")
        return record
    name, value = extend
    option = "--" + name.replace("_", "-")
    if name not in record:
        raise ValueError(f"{run_dir} has no {name} to extend: is it a {command} run?")
    if value <= record[name]:
        raise ValueError(f"{option} {value} does not extend {run_dir}, whose {name} is {record[name]}: give more")
    return {**record, name: value}


def new_run_dir(out: str | Path, name: str) -> Path:
    """Make and return ``out/<name>-<time>`` (with a suffix when that exists already); characters a file name may
    not hold everywhere (the ``:`` of a ``module:task`` name) become ``_``."""
    name = re.sub(r"[^\w.-]", "_", name)
    base = Path(out) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, k = base, 1
    while run_dir.exists():  # two runs started in the same second
        run_dir, k = base.with_name(f"{base.name}-{k}"), k + 1
    run_dir.mkdir(parents=True)
    return run_dir


def evaluation_record(evaluation: Evaluation) -> dict[str, Any]:
    """What a run saves of an evaluation: the summary and every prompt with its completion."""
    return {"summary": evaluation.summary, "prompts": evaluation.prompts, "completions": evaluation.completions}


def paired_samples(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, str]]:
    """The report's held-out samples: each prompt with its completion before and after training."""
    prompts, b, a = before["prompts"], before["completions"], after["completions"]
    return [{"prompt": p, "before": x, "after": y} for p, x, y in zip(prompts, b, a, strict=True)]


def constraints_table(summary: dict[str, dict[str, float]] | None) -> str:
    """The report's table of :meth:`agents.constraints.Lagrangian.summary` (empty without constraints)."""
    if not summary:
        return ""
    rows = "\n".join(
        f"| {name} | {c.get('held_out_mean', float('nan')):.3f} | {c['final_mean']:.3f} | {c['final_lambda']:.3f} | "
        f"{c['violated_share_second_half']:.0%} |"
        for name, c in summary.items()
    )
    head = "| constraint | final policy, held-out mean | last rollout's mean | λ | rollouts broken, 2nd half |"
    return f"\n\n{head}\n|---|---|---|---|---|\n{rows}"


def before_after_table(before: dict[str, Any], after: dict[str, Any], n_samples: int = 3) -> str:
    """The report's markdown: each metric before and after training, then a few held-out samples side by side."""
    rows = ["| metric | before | after |", "|---|---|---|"]
    for key in ("reward_model_score", "gold_score", "kl", "perplexity", "distinct_1", "distinct_2"):
        rows.append(f"| {key} | {before['summary'][key]:.3f} | {after['summary'][key]:.3f} |")
    rows += ["", "| prompt | before | after |", "|---|---|---|"]
    for i in range(min(n_samples, len(before["prompts"]))):
        cells = [before["prompts"][i], before["completions"][i], after["completions"][i]]
        rows.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def train(
    config: TrainConfig | None = None, resume: str | Path | None = None, total_timesteps: int | None = None
) -> dict[str, Any]:
    """Train, evaluate on held-out prompts before and after, save the run; return the report.

    The settings, the data and the model are checked (the run is built) before the run directory is made, so a
    start that fails leaves nothing behind.

    :param config: the run's settings (ignored with ``resume``, whose ``config.json`` is used).
    :param resume: a run directory of an interrupted run: continue it from its last checkpoint.
    :param total_timesteps: with ``resume``, train on to this many steps, above the run's total: extends a finished
        run as well as an interrupted one (SB3's ``learn(..., reset_num_timesteps=False)``).
    :raises Interrupted: on SIGINT/SIGTERM, after saving a checkpoint.
    """
    if total_timesteps is not None and resume is None:
        raise ValueError("total_timesteps extends a run given by resume; a new run takes it in its TrainConfig")
    if resume is not None:
        run_dir = Path(resume)
        extend = None if total_timesteps is None else ("total_timesteps", total_timesteps)
        config = TrainConfig(**resumable_config(run_dir, extend=extend))
        if (run_dir / "report.json").is_file() and not (run_dir / CHECKPOINT / "state.json").is_file():
            raise ValueError(f"{run_dir} finished without keeping its end state (an older run): it cannot be extended")
    else:
        config = config or TrainConfig()
    torch.manual_seed(config.seed)
    run = build_run(config)  # the task, the data, the reward and the model: any mistake shows here
    if resume is None:
        run_dir = new_run_dir(config.out, f"{config.task}-{config.algo}")
    state = restore_checkpoint(run, run_dir) if resume is not None else {}
    if total_timesteps is not None:
        set_aside_report(run_dir, "total_timesteps")
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))  # an extension's new total too
    state.setdefault("train_seconds", 0.0)
    state["resumed"] = resume is not None
    state["peak_rss_gb"] = max(state.get("peak_rss_gb", 0.0), peak_rss_gb())

    if (run_dir / "before.json").is_file():
        before = json.loads((run_dir / "before.json").read_text())
    else:
        before = evaluation_record(run.evaluate())
        (run_dir / "before.json").write_text(json.dumps(before, indent=1))

    learn_with_checkpoints(run, run_dir, state)
    # The end state is a checkpoint too (β, the reward scale, the metrics, the RNG), so that --total-timesteps can
    # extend the finished run; its weights and optimiser state are the run's model.zip, not a second copy.
    save_checkpoint(run, run_dir, run.algo.num_timesteps, state)
    (run_dir / CHECKPOINT / "model.zip").replace(run_dir / "model.zip")
    final = run.evaluate()
    after = evaluation_record(final)
    reference = f"{config.model} (the SFT model of --init {config.init})" if config.init else config.model
    table = before_after_table(before, after) + f"\n\nKL and perplexity against the starting model: {reference}."
    constraints = run.kl.constraints.summary(final.quantities) if run.kl.constraints is not None else None
    table += constraints_table(constraints)
    report = {
        "config": asdict(config),
        "before": before["summary"],
        "after": after["summary"],
        "train_seconds": state["train_seconds"],
        "resumed": state["resumed"],
        "history": run.metrics.history,
        "held_out_history": run.metrics.held_out,  # --eval-every: the held-out summary along training
        "kl_reference": config.model,  # the starting model, an SFT run's with --init (InstructGPT's reference)
        "final_beta": run.kl.controller.beta,
        "final_reward_scale": None if run.kl.reward_scale is None else run.kl.reward_scale.scale,
        "constraints": constraints,  # per bound: the final policy's held-out mean, the last rollout's, λ, late breaks
        "peak_rss_gb": max(state["peak_rss_gb"], peak_rss_gb()),
        "machine": f"{cpu_kind()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "samples": paired_samples(before, after),
        "run_dir": str(run_dir),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    (run_dir / "report.md").write_text(table + "\n")
    plot_training(run.metrics.history, run_dir / "training.png", run.env.get_attr("gold")[0], run.metrics.held_out)
    print(table)
    print(f"\nsaved to {run_dir} (load with {type(run.algo).__name__}.load('{run_dir / 'model'}'))")
    return report


def cpu_kind() -> str:
    """The CPU model and its bf16 support (what decides which matmul kernels bf16 autocast runs)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    bf16 = [label for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return f"{name} ({', '.join(bf16) or 'no native bf16'})"


def learn_with_checkpoints(run: Run, run_dir: Path, state: dict[str, Any], command: str = "textgen train") -> None:
    """Train ``run.algo`` up to ``run.config.total_timesteps``, saving ``run_dir/checkpoint`` every
    ``checkpoint_every`` rollouts and on SIGINT/SIGTERM; add the seconds spent to ``state["train_seconds"]``.

    ``run`` is fresh or restored by :func:`restore_checkpoint` (its ``num_timesteps`` says where it stands).

    :param state: the record saved with every checkpoint (``train_seconds``, ``peak_rss_gb`` and anything else).
    :param command: the command whose ``--resume`` continues the run, for the message of :class:`Interrupted`.
    :raises Interrupted: on SIGINT/SIGTERM, after saving a checkpoint at the last rollout boundary.
    """
    checkpointer = _Checkpointer(run, run_dir, run.config.checkpoint_every, state)
    remaining = run.config.total_timesteps - run.algo.num_timesteps
    if remaining > 0:
        run.algo.learn(
            remaining, callback=run.callbacks(checkpointer), reset_num_timesteps=run.algo.num_timesteps == 0,
            progress_bar=_has_progress_bar(),
        )  # fmt: skip
    if checkpointer.stop_requested:
        checkpointer.save()
        raise Interrupted(run_dir, checkpointer.boundary, command)
    state["train_seconds"] += time.time() - checkpointer.started


def json_safe(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by ``None`` (they are not JSON), in nested dicts, lists, tuples:
    e.g. a gold accuracy when every held-out pair ties on gold, or an ensemble's shared weight decay."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def status_gb(field: str) -> float:
    """A memory field of Linux's ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in GiB; what :func:`peak_rss_gb` reads
    and the benchmarks that measure a peak's rise (``VmHWM`` after resetting it to ``VmRSS``) read too."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024**2  # kB
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, in GiB.

    Linux's ``VmHWM`` (``/proc/self/status``), not ``getrusage``'s ``ru_maxrss``: Linux carries ``ru_maxrss``
    across ``execve``, so a run started by a larger process (a benchmark that evaluated the base model first)
    reported its parent's peak (a child of a 2 GB Python process that touched 14 MB read 2.0 GB). Elsewhere,
    ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        return status_gb("VmHWM")
    except (OSError, RuntimeError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if platform.system() == "Darwin" else peak / 1024**2


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else str(value)


def _has_progress_bar() -> bool:
    try:
        import rich  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing to files only (the Agg backend): every plot of a run or benchmark is a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(
    history: list[dict[str, float]], path: Path, gold: Any = None, held_out: Sequence[dict[str, float]] = ()
) -> None:
    """Reward-model and gold score per rollout (and the held-out gold of ``--eval-every``), as a PNG (none before
    the first rollout ends)."""
    if not history:
        return
    plt = pyplot()
    steps = [h["timesteps"] for h in history]
    bounds = sorted({k.split("/")[1] for h in history for k in h if k.startswith("constraint/")})
    fig, axes = plt.subplots(1 + len(bounds), 1, figsize=(6, 3.5 + 2.5 * len(bounds)), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [h["reward_model_score"] for h in history], label="reward model")
    ax.plot(steps, [h["gold_score"] for h in history], label=f"gold ({scorer_name(gold)})")
    if held_out:  # --eval-every
        ax.plot([h["timesteps"] for h in held_out], [h["gold_score"] for h in held_out], "o--",
                label="gold, held-out prompts")  # fmt: skip
    ax.set_xlabel("environment steps (tokens)")
    ax.set_ylabel("mean score of finished episodes")
    ax.legend()
    for bound, ax in zip(bounds, axes[1:, 0], strict=True):  # each constrained quantity against its bound, and λ
        rows = [h for h in history if f"constraint/{bound}/mean" in h]
        x = [h["timesteps"] for h in rows]
        constraint = Constraint.read(bound)
        assert constraint is not None  # the key was written from one
        ax.plot(x, [h[f"constraint/{bound}/mean"] for h in rows], label=constraint.name)
        ax.axhline(constraint.bound, ls="--", color="grey", label=bound)
        ax.legend(loc="upper left")
        twin = ax.twinx()
        twin.plot(x, [h[f"constraint/{bound}/lambda"] for h in rows], color="tab:red", alpha=0.6)
        twin.set_ylabel("λ", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
