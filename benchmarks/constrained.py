"""Constrained RLHF (``--constraint``) against the unconstrained objective and against fixed weights, over seeds.

Cases, each ``textgen train`` with its defaults but what the case sets:

- ``positive-review``: maximise the reward model subject to ``kl<=6`` and ``distinct2>=0.85``;
- ``dialogue``: maximise ``chrf - echo`` (a composite reward) subject to fluency, ``ref_logprob`` at least the base
  model's mean - 0.5, and a length within the references' interquartile range (in tokens), both measured on the
  *train* split once, before any run;
- ``infeasible``: positive-review subject to ``kl<=0.5`` alone, which the objective pulls against: the multiplier
  must grow and hold the bound, without the policy collapsing.

Arms of each case: ``unconstrained`` (the objective alone: every λ held at 0, the bounds only measured); ``adaptive``
(where the case bounds the KL: β steered toward it by ``--target-kl``, what a user with a budget types);
``adaptive-sweep`` (the same controller aimed at lower targets, ``--target-kls``, on each seed in ascending order until
its held-out KL reaches the constrained arm's on that seed: Ziegler et al.'s controller overshoots its target in a short
run, so no single target lands on the budget, and the issue compares gold at the same final KL, which :func:`gold_at_kl`
interpolates); ``fixed`` (every bound's multiplier held at a weight ``w``: ``--constraint-lr 0 --constraint-init w``);
``constrained`` (dual ascent from λ = 0 with step ``--constraint-lr η``, the defaults otherwise: each step reads the
rollout's mean one standard error toward breaking the bound); ``plain-mean`` (the same on the plain mean,
``--constraint-margin-se 0``: what the margin buys; trained only when ``--arms`` names it). ``w`` and each ``η`` are
tuned once on seed 0 (over ``--weights`` and ``--constraint-lrs``) by the training episodes, never the held-out prompts:
the best last-rollout reward among the values whose last rollout holds every bound within 5 %, else the value that
breaks them least (:func:`tune`). A bound holds at the end of training when the final policy's mean over the held-out
completions is within 5 % of it (:func:`final_value`). Every run is a separate process whose directory is reused when it
finished and resumed from its last checkpoint when it stopped midway, so a stopped benchmark resumes. Run::

    python benchmarks/constrained.py --runs RUNS            # 3 cases x 4 arms x 3 seeds, plus the tuning runs
    python benchmarks/constrained.py --quick                # a tiny model and budget, one seed (what CI runs)

Writes ``<out>/constrained.md``, ``.json`` and ``.png`` (each bound's training mean per rollout, per arm, against
the bound). Per run: held-out gold before and after, KL, distinct-2, length, tokens/s of training; per bound: the
final policy's held-out mean, the last rollout's mean, λ, and the share of rollouts in the second half of training that
broke it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from textgen_train_seeds import finished, run_textgen

from agents.constraints import Constraint
from agents.train import cpu_kind, pyplot

ARMS = ("unconstrained", "adaptive", "fixed", "plain-mean", "constrained")
SWEEP = "adaptive-sweep"  # not a row of its own: adaptive β at the constrained arm's KL (:func:`equal_kl`)
QUICK = ["--reward-model", "gold", "--total-timesteps", "64", "--n-envs", "2", "--n-steps", "8", "--batch-size", "8",
         "--max-new-tokens", "8", "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16", "--max-prompt-tokens", "240",
         "--reward-scale-prompts", "2"]  # fmt: skip


def case_settings(name: str, quick: bool, model: str, kept: Path) -> dict[str, Any]:
    """A case's task, objective options and bounds. Dialogue's are measured on its train split once and kept at
    ``kept/bounds.json``, so every run of the case, on any machine, trains against the same bounds."""
    if name == "positive-review":
        return {"task": name, "objective": [], "bounds": ["kl<=6", "distinct2>=0.85"], "target_kl": 6.0}
    if name == "infeasible":
        return {"task": "positive-review", "objective": [], "bounds": ["kl<=0.5"]}
    path = kept / "bounds.json"
    if not path.is_file():
        fluency, low, high = dialogue_bounds(model, quick)
        bounds = [f"ref_logprob>={fluency:.3f}", f"length>={low:g}", f"length<={high:g}"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"bounds": bounds, "machine": cpu_kind()}, indent=1) + "\n")
    bounds = json.loads(path.read_text())["bounds"]
    return {"task": "dialogue", "objective": ["--reward", "chrf - echo"], "bounds": bounds}


def dialogue_bounds(model: str, quick: bool) -> tuple[float, float, float]:
    """The base model's mean log-prob per token on dialogue's train prompts minus 0.5, and the interquartile range of
    the train references' lengths in tokens (the model's tokenizer): a typical reply's length. Measured: the references
    run from 1 token (5th percentile) to 67 (95th), median 6, so a 5th-95th range holds every completion that the
    32-token cap allows and would bound nothing, while the base model's replies run to the cap (31 tokens on
    average)."""
    from agents.evaluate import evaluate_base_model
    from text_env.models import load_tokenizer
    from text_env.tasks import get_task

    n = 4 if quick else 64
    kwargs = {"max_new_tokens": 8, "max_prompt_tokens": 240, "bf16": False} if quick else {}
    base = evaluate_base_model("dialogue", model, n_prompts=n, split="train", n_envs=min(n, 16), **kwargs)
    fluency = float(np.mean(base.reference_log_prob / np.maximum(base.n_tokens, 1))) - 0.5
    tokenizer = load_tokenizer(model)
    references = [r for e in get_task("dialogue").examples("train") for r in e.references]
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    low, high = np.percentile(lengths, [25, 75])
    cap = 8 if quick else get_task("dialogue").max_new_tokens  # the tiny model's characters outrun --quick's cap
    high = min(float(cap), float(np.ceil(high)))
    return fluency, min(max(1.0, float(np.floor(low))), high), high


def run(out: Path, options: list[str], kept: Path, train: bool = True) -> dict[str, Any] | None:
    """``textgen train OPTIONS --out OUT`` in its own process, unless it finished before; its report (``None`` when
    it has not run and ``train`` is off).

    Each finished run's report is also kept at ``kept`` (beside the results, committed), so the benchmark resumes
    on another machine where ``out`` is gone: at the default budget it takes more CPU-hours than one sitting."""
    if kept.is_file():
        return json.loads(kept.read_text())
    if not train and finished(out) is None:
        return None
    report = run_textgen("train", out, options)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(report, indent=1))
    return report


def excess(spec: str, value: float) -> float:
    """How far ``value`` breaks the bound ``spec`` beyond 5 % of the bound (the issue's tolerance), as a share of the
    bound (0: it holds; ``inf``: not a bound)."""
    bound = Constraint.read(spec)
    if bound is None:
        return np.inf
    return max(0.0, bound.violation(value) - 0.05 * abs(bound.bound)) / max(abs(bound.bound), 1e-9)


def last_excess(report: dict[str, Any]) -> float:
    """The largest :func:`excess` over a run's bounds of its last rollout's means (0: all held)."""
    return max(excess(b, c["final_mean"]) for b, c in report["constraints"].items())


TUNED = {
    "fixed": ("w", "--constraint-init", ["--constraint-lr", "0"]),
    "plain-mean": ("z0-lr", "--constraint-lr", ["--constraint-margin-se", "0"]),
    "constrained": ("lr", "--constraint-lr", []),
}
"""The arms tuned on seed 0: the prefix of their tuning runs (and the setting's name in the table), the option each
value sets and the arm's other options."""


def tune(
    case: dict[str, Any],
    arm: str,
    values: list[float],
    runs: Path,
    kept: Path,
    common: list[str],
    train: bool = True,
) -> tuple[float | None, dict[float, dict[str, Any]]]:
    """An arm's setting, chosen on seed 0's training episodes (never the held-out prompts): the fixed weight
    (``--constraint-lr 0 --constraint-init w``) or the dual step (``--constraint-lr η``). The best last-rollout
    reward among the values whose last rollout holds every bound within 5 %, else the value that breaks them least
    (with ``train`` off, among the values run so far, which the table lists; ``None``: none); and the report of every
    value run so far. The winner's run is the arm's seed 0 (:func:`run_path`)."""
    prefix = TUNED[arm][0]
    reports = {}
    for value in values:
        options = [*common, "--seed", "0", *tuned_options(case, arm, value)]
        at = Path("tuning", f"{prefix}{value:g}")
        report = run(runs / at, options, kept / f"{at}.json", train)
        if report is not None:
            reports[value] = report
    if not reports:
        return None, reports
    scored = []
    for value, report in reports.items():
        last = report["history"][-1]["reward_model_score"] if report["history"] else -np.inf
        excess = last_excess(report)
        scored.append((excess > 0, excess if excess > 0 else -last, value))
    return min(scored)[2], reports


def tuned_options(case: dict[str, Any], arm: str, value: float) -> list[str]:
    """A tuned arm's training options at one setting (its tuning runs and its seeds alike)."""
    _, option, extra = TUNED[arm]
    return [*case["objective"], *_bounds(case), option, str(value), *extra]


def run_path(arm: str, seed: int, setting: float | None) -> Path:
    """Where one arm's seed lives under a case: a tuned arm's seed 0 is the tuning run of its chosen setting, and its
    other seeds sit under that setting, so a setting chosen anew (a value added to the grid) never reads back seeds
    trained at another."""
    if arm in TUNED:
        at = f"{TUNED[arm][0]}{setting:g}"
        return Path("tuning", at) if seed == 0 else Path(arm, at, f"seed{seed}")
    return Path(arm, f"seed{seed}")


def measured_options(case: dict[str, Any]) -> list[str]:
    """The objective with every λ held at 0: the bounds measured, never enforced (the unconstrained arms)."""
    return [*case["objective"], *_bounds(case), "--constraint-lr", "0"]


def _bounds(case: dict[str, Any]) -> list[str]:
    return [arg for bound in case["bounds"] for arg in ("--constraint", bound)]


def row(arm: str, seed: int, report: dict[str, Any]) -> dict[str, Any]:
    before, after = report["before"], report["after"]
    tokens = report["config"]["total_timesteps"]
    return {
        "arm": arm, "seed": seed, "gold_before": before["gold_score"], "gold_after": after["gold_score"],
        "kl": after["kl"], "distinct_2": after["distinct_2"], "length": after["length"],
        "tokens_per_second": tokens / max(report["train_seconds"], 1e-9), "constraints": report.get("constraints"),
        "final": {b: final_value(report, b) for b in report.get("constraints") or {}},
        "history": report["history"], "machine": report.get("machine", "?"), "bf16": report["config"]["bf16"],
    }  # fmt: skip


def final_value(report: dict[str, Any], spec: str) -> tuple[float, str]:
    """A bound's quantity at the end of training and where it was read: the final policy's mean over the held-out
    completions (``held out``); for a run kept before reports measured it there, the held-out summary's KL or length
    (the same per-completion means), else the last rollout's mean (``last rollout``)."""
    measured = report["constraints"][spec]
    if np.isfinite(measured.get("held_out_mean", np.nan)):
        return measured["held_out_mean"], "held out"
    name = Constraint.read(spec).name  # type: ignore[union-attr]
    if name in ("kl", "length"):
        return report["after"][name], "held out"
    return measured["final_mean"], "last rollout"


def holds(spec: str, value: float) -> bool:
    """Whether ``value`` keeps the bound ``spec`` within 5 % of the bound (the issue's tolerance)."""
    return excess(spec, value) == 0


def gold_at_kl(points: list[tuple[float, float]], kl: float) -> tuple[float, float, float] | None:
    """Gold at ``kl`` from one controller's (KL, gold) points, linear in √KL (Gao et al.'s axis, along which gold
    rises near-linearly at small KL) between the two nearest points that bracket it; with those two KLs. ``None``
    when no point reaches ``kl``."""
    points = sorted(points)
    for (k0, g0), (k1, g1) in itertools.pairwise(points):
        if k0 <= kl <= k1:
            d0, d1, d = np.sqrt([k0, k1, kl])
            return g0 + (g1 - g0) * ((d - d0) / (d1 - d0) if d1 > d0 else 0.0), k0, k1
    return None


def sweep_path(seed: int, target: float) -> Path:
    """Where adaptive β's run at ``target`` lives under a case: seed 0's are the runs that once tuned the target."""
    return Path("tuning" if seed == 0 else Path(SWEEP, f"seed{seed}"), f"target{target:g}")


def equal_kl(
    case: dict[str, Any],
    rows: list[dict[str, Any]],
    targets: list[float],
    runs: Path,
    kept: Path,
    common: list[str],
    train: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The issue's comparison under a KL budget: per seed of the constrained arm, adaptive β's held-out gold at that
    run's final KL, and the rows of the adaptive runs it read.

    Adaptive β (λ held at 0, the bounds measured) runs on the seed at ``targets`` in ascending order until one lands
    at or past the constrained run's KL, each run as :func:`tune` runs its values (read back when it finished; with
    ``train`` off, skipped when it has not). Its points are the base model (KL 0, the seed's gold before), those
    runs and the ``adaptive`` arm's run at the budget; :func:`gold_at_kl` interpolates between the two that bracket
    the constrained KL."""
    measured = measured_options(case)
    compared, sweep = [], []
    for r in (r for r in rows if r["arm"] == "constrained"):
        seed = r["seed"]
        points = [(0.0, r["gold_before"], "base")]
        points += [(a["kl"], a["gold_after"], f"target {case['target_kl']:g}") for a in rows
                   if a["arm"] == "adaptive" and a["seed"] == seed]  # fmt: skip
        for target in sorted(targets):
            at = sweep_path(seed, target)
            options = [*common, "--seed", str(seed), *measured, "--target-kl", str(target)]
            report = run(runs / at, options, kept / f"{at}.json", train)
            if report is None:
                break
            sweep.append(row(f"adaptive target={target:g}", seed, report))
            points.append((sweep[-1]["kl"], sweep[-1]["gold_after"], f"target {target:g}"))
            if sweep[-1]["kl"] >= r["kl"]:
                break
        interpolated = gold_at_kl([(k, g) for k, g, _ in points], r["kl"])
        compared.append({
            "seed": seed, "kl": r["kl"], "gold": r["gold_after"], "points": points,
            "adaptive_gold": None if interpolated is None else interpolated[0],
            "bracket": None if interpolated is None else interpolated[1:],
        })  # fmt: skip
    return compared, sweep


def equal_kl_markdown(compared: list[dict[str, Any]]) -> list[str]:
    if not compared:
        return []
    lines = ["Under the KL budget, at the same final KL: adaptive β (`--target-kl T`, λ held at 0) on each seed at "
             "ascending targets until its held-out KL reaches the constrained run's; its gold interpolated linearly "
             "in √KL between the two points that bracket that KL (the base model at KL 0 and the `adaptive` arm's "
             "run are points too).", "",
             "| seed | constrained: KL, gold | adaptive β's points (KL, gold) | adaptive β at that KL | difference |",
             "|---|---|---|---|---|"]  # fmt: skip
    for c in compared:
        points = "; ".join(f"{name}: {k:.2f}, {g:.3f}" for k, g, name in sorted(c["points"]))
        at = "not reached" if c["adaptive_gold"] is None else f"{c['adaptive_gold']:.3f}"
        diff = "–" if c["adaptive_gold"] is None else f"{c['gold'] - c['adaptive_gold']:+.3f}"
        lines.append(f"| {c['seed']} | {c['kl']:.2f}, {c['gold']:.3f} | {points} | {at} | {diff} |")
    done = [c for c in compared if c["adaptive_gold"] is not None]
    if done:
        mean = np.mean([c["gold"] for c in done]), np.mean([c["adaptive_gold"] for c in done])
        lines.append(f"| mean of {len(done)} | {np.mean([c['kl'] for c in done]):.2f}, {mean[0]:.3f} | | "
                     f"{mean[1]:.3f} | {mean[0] - mean[1]:+.3f} |")  # fmt: skip
    return [*lines, ""]


def markdown(results: dict[str, Any], command: str, machine: str) -> str:
    title = "# Constrained RLHF against the unconstrained objective and fixed weights"
    lines = [title, "", f"Command: `{command}`", "",
             f"Table written on: {machine}; each run's own machine and dtype are in its row (runs are kept and "
             "reused across machines: bf16 is on by default only where the CPU runs it natively). Held-out: each "
             "task's first eval prompts before and after; KL in nats per completion to the base model; per bound: "
             "the final policy's mean over the held-out completions (✓: within 5 % of the bound; † where a run kept "
             "from before held-out bounds were measured has only its last rollout's), the last training rollout's "
             "mean, its multiplier λ and the share of second-half rollouts that broke it. The distinct-2 column is "
             "held-out: unique word bigrams over all completions together, the figure that falls when the policy "
             "narrows to a few stock phrases; the "
             "`distinct2` bound reads each training episode alone (token bigrams within one completion), which "
             "repeat far less: compare the bound's last mean with the column.", ""]  # fmt: skip
    for name, case in results.items():
        lines += [f"## {name}: {', '.join(case['bounds'])}", ""]
        labels = {"fixed": "fixed weight", "plain-mean": "dual step on the plain mean", "constrained": "dual step"}
        tuned = [
            f"{labels[arm]} {value:g} (of {', '.join(f'{v:g}' for v in case['tried'][arm])})"
            for arm, value in case["tuned"].items()
            if value is not None
        ]
        if tuned:
            lines += [f"Tuned on seed 0's training episodes: {', '.join(tuned)}.", ""]
        lines += ["| arm | seed | gold before → after | KL | distinct-2 | length | tokens/s | bounds (final, last "
                  "rollout, λ, broken late) | machine |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in [*case["rows"], *case.get("tuning", []), *case.get("sweep", [])]:
            bounds = "; ".join(
                f"{b}: {_final(r, b)}, {c['final_mean']:.3f}, {c['final_lambda']:.3g}, "
                f"{c['violated_share_second_half']:.0%}"
                for b, c in (r["constraints"] or {}).items()
            )
            where = f"{r['machine'].split(', torch')[0]}, {'bf16' if r['bf16'] else 'float32'}"
            lines.append(
                f"| {r['arm']} | {r['seed']} | {r['gold_before']:.3f} → {r['gold_after']:.3f} | {r['kl']:.2f} | "
                f"{r['distinct_2']:.3f} | {r['length']:.1f} | {r['tokens_per_second']:.1f} | {bounds or '–'} | "
                f"{where} |"
            )
        lines += ["", "| arm | seeds | gold gain: mean, worst | gold after: mean | KL: mean | bounds held at the end "
                  "(±5 %) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for arm in ARMS:
            rows = [r for r in case["rows"] if r["arm"] == arm]
            if rows:
                gains = [r["gold_after"] - r["gold_before"] for r in rows]
                held = sum(all(holds(b, value) for b, (value, _) in r["final"].items()) for r in rows)
                lines.append(
                    f"| {arm} | {len(rows)} | {np.mean(gains):+.3f}, {min(gains):+.3f} | "
                    f"{np.mean([r['gold_after'] for r in rows]):.3f} | {np.mean([r['kl'] for r in rows]):.2f} | "
                    f"{held} of {len(rows)} |"
                )
        lines += ["", *equal_kl_markdown(case.get("equal_kl") or [])]
    return "\n".join(lines) + "\n"


def _final(r: dict[str, Any], spec: str) -> str:
    value, where = r["final"][spec]
    return f"{value:.3f}{'' if where == 'held out' else '†'}{' ✓' if holds(spec, value) else ' ✗'}"


def plot(results: dict[str, Any], path: Path) -> None:
    """Each bound's training mean per rollout, per arm (seed 0), against the bound."""
    panels = [(name, b) for name, case in results.items() for b in case["bounds"]]
    plt = pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.4 * len(panels)), squeeze=False)
    for (name, bound), ax in zip(panels, axes[:, 0], strict=True):
        for r in results[name]["rows"]:
            rows = [h for h in r["history"] if f"constraint/{bound}/mean" in h]
            if r["seed"] == 0 and rows:
                ax.plot([h["timesteps"] for h in rows], [h[f"constraint/{bound}/mean"] for h in rows], label=r["arm"])
        ax.axhline(Constraint.read(bound).bound, ls="--", color="grey")  # type: ignore[union-attr]
        ax.set_title(f"{name}: {bound}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bookkeeping(specs: list[str], rollouts: int = 200, n_steps: int = 32, n_envs: int = 16) -> dict[str, float]:
    """What the multipliers add to a rollout: :class:`~agents.constraints.Lagrangian`'s charge and dual step on a
    default rollout's arrays (``n_steps x n_envs``, every episode ending at the last step, as positive-review's
    32-token episodes do), median seconds per rollout. The KL and reference log-probs they read are computed for the
    KL penalty anyway; nothing else runs only for the constraints."""
    from agents.constraints import Lagrangian, parse_constraints

    rng = np.random.default_rng(0)
    lagrangian = Lagrangian(parse_constraints(specs))
    lagrangian.start(n_envs)
    dones = np.zeros((n_steps, n_envs), dtype=bool)
    dones[-1] = True
    times = []
    for _ in range(rollouts):
        rewards, kl = rng.normal(size=(2, n_steps, n_envs)).astype(np.float32)
        ref = -np.abs(rng.normal(size=(n_steps, n_envs)))
        actions = rng.integers(0, 49152, size=(n_steps, n_envs))
        tic = time.perf_counter()
        lagrangian.charge(rewards, kl, ref, actions, dones)  # the dual step, then the charges
        lagrangian.take_logged()
        times.append(time.perf_counter() - tic)
    return {"seconds_per_rollout": float(np.median(times)), "rollouts": rollouts}


def bookkeeping_report(out: Path, command: str) -> dict[str, Any]:
    """``constrained_bookkeeping.md``: the multipliers' seconds per rollout against a default run's rollout+update
    (``textgen_train_seeds.json``: training seconds / rollouts, each seed)."""
    specs = ["kl<=6", "distinct2>=0.85"]
    measured = bookkeeping(specs)
    runs = json.loads((out / "textgen_train_seeds.json").read_text())
    per_rollout = [
        r["train_seconds"] * r["config"]["n_envs"] * r["config"]["n_steps"] / r["config"]["total_timesteps"]
        for r in runs
    ]
    share = measured["seconds_per_rollout"] / min(per_rollout)
    text = (
        f"# What the Lagrange multipliers cost per rollout\n\nCommand: `{command.strip()}`\n\nMachine: {cpu_kind()}."
        f"\n\n`Lagrangian.charge` (the dual step, then the charges) for `{' '.join(specs)}` on a default rollout's "
        f"arrays (32 steps x 16 envs), median of {measured['rollouts']}: "
        f"**{measured['seconds_per_rollout'] * 1e3:.2f} ms**. A default run's "
        f"rollout + update took {min(per_rollout):.1f}-{max(per_rollout):.1f} s ([textgen_train_seeds.md]"
        f"(textgen_train_seeds.md), one per seed), so the constraints cost at most **{100 * share:.3f} %** of it "
        "(target: within 5 %): they read the per-token KL and reference log-probs that the KL penalty computes "
        "anyway, and add no pass of any model.\n"
    )
    (out / "constrained_bookkeeping.md").write_text(text)
    print(text)
    return {**measured, "share_of_rollout": share}


def throughput(config_options: dict[str, Any], specs: list[str], pairs: int) -> dict[str, Any]:
    """Seconds per rollout + update with and without the multipliers, side by side in one process: one run of
    ``textgen train``'s defaults (with ``config_options``) whose :class:`~agents.kl.KLPenalty` holds the
    :class:`~agents.constraints.Lagrangian` of ``specs`` in every other rollout and none in the rest, ordered
    on, off, off, on per pair so that a drift of the machine's speed (other work on its cores) falls on both. Each
    rollout + update is one ``learn`` call of one rollout's tokens; one rollout before the timed ones measures the
    reward scale and the bounds' units. positive-review's episodes all run to their 32 tokens, so each rollout does
    the same work whichever the policy has become."""
    from agents.run import TrainConfig, build_run

    config = TrainConfig(**config_options, constraints=specs)  # the default dual step
    run = build_run(config, verbose=0)
    lagrangian, tokens = run.kl.constraints, config.n_envs * config.n_steps

    def once(constrained: bool) -> float:
        run.kl.constraints = lagrangian if constrained else None
        tic = time.perf_counter()
        run.algo.learn(tokens, callback=run.callbacks(), reset_num_timesteps=False)
        return time.perf_counter() - tic

    once(True)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(pairs):
        for constrained in (True, False, False, True):
            seconds[constrained].append(once(constrained))
    on, off = np.array(seconds[True]), np.array(seconds[False])
    ratios = (on[0::2] + on[1::2]) / (off[0::2] + off[1::2])  # each pair's on / off
    return {
        "constrained_seconds": on.tolist(), "unconstrained_seconds": off.tolist(), "pair_ratios": ratios.tolist(),
        "ratio": float(on.sum() / off.sum()), "lambdas": [float(x) for x in lagrangian.lambdas],  # type: ignore[union-attr]
        "tokens_per_rollout": tokens, "machine": cpu_kind(), "bf16": config.bf16, "dual_step": config.constraint_lr,
    }  # fmt: skip


def throughput_report(out: Path, command: str, pairs: int, quick: dict[str, Any] | None = None) -> dict[str, Any]:
    """``constrained_throughput.md`` / ``.json``: :func:`throughput` on positive-review with its benchmark bounds."""
    import torch

    specs = ["kl<=6", "distinct2>=0.85"]
    measured = throughput({"task": "positive-review", **(quick or {})}, specs, pairs)
    threads = torch.get_num_threads()
    on, off = np.mean(measured["constrained_seconds"]), np.mean(measured["unconstrained_seconds"])
    text = (
        f"# Throughput with and without the Lagrange multipliers\n\nCommand: `{command.strip()}`\n\nMachine: "
        f"{measured['machine']}, {'bf16' if measured['bf16'] else 'float32'}, "
        f"{threads} thread(s).\n\nOne `textgen train` run (positive-review, "
        f"{'--quick: a tiny model and budget' if quick else 'its defaults'}), every other rollout + update with "
        f"`{' '.join(specs)}` (dual step {measured['dual_step']:g}) and the rest without, "
        f"ordered on, off, off, on per pair ({pairs} pairs, {measured['tokens_per_rollout']} tokens per rollout):\n\n"
        f"| | seconds per rollout + update (mean) | each |\n|---|---|---|\n"
        f"| with the multipliers | {on:.2f} | {', '.join(f'{x:.1f}' for x in measured['constrained_seconds'])} |\n"
        f"| without | {off:.2f} | {', '.join(f'{x:.1f}' for x in measured['unconstrained_seconds'])} |\n\n"
        f"Ratio with / without: **{measured['ratio']:.3f}** (per pair: "
        f"{', '.join(f'{x:.3f}' for x in measured['pair_ratios'])}; target: within 5 %). λ at the end: "
        f"{', '.join(f'{x:.3g}' for x in measured['lambdas'])}. The spread between pairs is the machine's (other "
        "work on its cores); the order puts it on both sides.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    stem = "constrained_throughput_quick" if quick else "constrained_throughput"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(measured, indent=1) + "\n")
    print(text)
    return measured


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", default="positive-review,dialogue,infeasible")
    parser.add_argument("--weights", default="0.01,0.03,0.1,0.3", help="fixed weights tried on seed 0")
    parser.add_argument("--constraint-lrs", default="0.05,0.2,0.5", help="dual step sizes tried on seed 0")
    parser.add_argument(  # measured on seed 0: target 1 ended at 6.3 nats held-out, target 2 at 13.0
        "--target-kls",
        default="0.5,1,2",
        help="adaptive β's targets, run on each seed in ascending order up to the constrained arm's KL (far below "
        "the budget: it overshoots)",
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--runs", default=None, help="keep the runs here and reuse finished ones (default: temporary)")
    parser.add_argument(
        "--arms", default=",".join([*(a for a in ARMS if a != "plain-mean"), SWEEP]),
        help="train only these arms (the table shows all kept; plain-mean, an ablation, only when named)",
    )  # fmt: skip
    parser.add_argument("--table-only", action="store_true", help="train nothing: the table of the kept runs")
    parser.add_argument("--quick", action="store_true", help="a tiny model (or --model), one seed, seconds")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--bookkeeping", action="store_true",
        help="only time the multipliers' own work per default rollout (no model; seconds)",
    )  # fmt: skip
    parser.add_argument(
        "--throughput", type=int, metavar="PAIRS", default=0,
        help="only time rollout + update with and without the multipliers, side by side in one run (PAIRS x 4)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.bookkeeping:
        return bookkeeping_report(Path(args.out), "python benchmarks/constrained.py " + " ".join(argv))
    if args.throughput:
        command = "python benchmarks/constrained.py " + " ".join(argv)
        if not args.quick:
            return throughput_report(Path(args.out), command, args.throughput)
        from text_env.models import make_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            quick = {"model": str(make_tiny_model(Path(tmp) / "tiny-lm")), "reward_model": "gold", "n_envs": 2,
                     "n_steps": 8, "batch_size": 8, "max_new_tokens": 8, "n_epochs": 1, "bf16": False,
                     "max_prompt_tokens": 240, "reward_scale_prompts": 2}  # fmt: skip
            return throughput_report(Path(args.out), command, args.throughput, quick)
    if args.quick:
        args.seeds, args.weights, args.constraint_lrs, args.target_kls = 1, "1", "0.5", "1"
    out = Path(args.out)
    stem = "constrained_quick" if args.quick else "constrained"
    train, chosen = not args.table_only, args.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        if args.quick and args.model == "default":
            from text_env.models import make_tiny_model

            args.model = str(make_tiny_model(runs / "tiny-lm"))
        results: dict[str, Any] = {}
        for name in args.cases.split(","):
            kept = out / f"{stem}_runs" / name
            case = case_settings(name, args.quick, args.model, kept)
            common = ["--task", case["task"], "--model", args.model, *(QUICK if args.quick else [])]
            grids = {"fixed": args.weights, "plain-mean": args.constraint_lrs, "constrained": args.constraint_lrs}
            settings, tried = {}, {}
            for arm, grid in grids.items():
                go = train and arm in chosen
                values = [float(v) for v in grid.split(",")]
                settings[arm], tried[arm] = tune(case, arm, values, runs / name, kept, common, go)
            measured = measured_options(case)
            arms = {
                "unconstrained": measured,  # the objective alone
                # β steered toward the KL bound (Ziegler et al.'s controller): the unconstrained way to a KL budget
                **({"adaptive": [*measured, "--target-kl", str(case["target_kl"])]} if "target_kl" in case else {}),
            }
            arms.update({arm: tuned_options(case, arm, value) for arm, value in settings.items() if value is not None})
            reports = [  # seed-major, so a stopped benchmark has every arm of its first seeds
                (arm, seed, run(runs / name / at, [*common, "--seed", str(seed), *options], kept / f"{at}.json", go))
                for seed in range(args.seeds)
                for arm, options in arms.items()
                for at, go in [(str(run_path(arm, seed, settings.get(arm))), train and arm in chosen)]
            ]
            rows = sorted(
                (row(*r) for r in reports if r[2] is not None), key=lambda r: (ARMS.index(r["arm"]), r["seed"])
            )
            # every setting tried so far, for the record (the choice reads training episodes only)
            tuning = [
                row(f"{arm} {TUNED[arm][0].removeprefix('z0-')}={v:g} (tuning)", 0, report)
                for arm, reports_of in tried.items()
                for v, report in reports_of.items()
            ]
            compared, sweep = [], []
            if "target_kl" in case:
                targets = [float(v) for v in args.target_kls.split(",")]
                go = train and SWEEP in chosen
                compared, sweep = equal_kl(case, rows, targets, runs / name, kept, common, go)
            results[name] = {
                "bounds": case["bounds"], "tuned": settings, "tried": {arm: sorted(r) for arm, r in tried.items()},
                "rows": rows, "tuning": tuning, "sweep": sweep, "equal_kl": compared,
            }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/constrained.py " + " ".join(argv)
    (out / f"{stem}.md").write_text(markdown(results, command.strip(), cpu_kind()))
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / f"{stem}.png")
    return results


if __name__ == "__main__":
    main()
