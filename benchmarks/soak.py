"""Memory soak: does the resident set of a ``textgen train`` run stay flat over a long run?

Runs the default ``textgen train`` configuration (:class:`agents.run.TrainConfig`, built by
:func:`agents.run.build_run`, with its KL penalty and metrics) for ``--minutes`` of rollouts and updates, samples the
process's RSS at the end of every rollout and after every update, and reports the growth after warm-up against
the target (< 5 %). Writes ``soak.json`` and ``soak.md`` (with the exact command and the CPU).

Run: ``python benchmarks/soak.py`` (default model, 30 minutes); smoke test:
``python benchmarks/soak.py --minutes 1 --model DIR --reward-model gold --max-prompt-tokens 128``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.run import TrainConfig, build_run
from agents.train import cpu_kind

TARGET_GROWTH = 0.05  # RSS growth after warm-up, as a fraction of the RSS at the end of warm-up


def rss_mib() -> float:
    """The process's current resident set (not the peak, which ``getrusage`` gives), in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSSampler(BaseCallback):
    """Record RSS after every rollout and after every update; stop at the first rollout that starts after the
    deadline or the rollout limit (so that every rollout counted is whole)."""

    def __init__(self, seconds: float, max_rollouts: int | None = None) -> None:
        super().__init__()
        self.seconds, self.max_rollouts = seconds, max_rollouts
        self.samples: list[dict[str, Any]] = []
        self.rollouts = 0
        self._stop = False

    def _on_training_start(self) -> None:
        self.started = time.time()

    def _record(self, phase: str) -> None:
        seconds = time.time() - self.started
        self.samples.append({"rollout": self.rollouts, "phase": phase, "seconds": seconds, "rss_mib": rss_mib()})

    def _on_rollout_start(self) -> None:
        if self.rollouts:
            self._record("after_update")
        over_time = time.time() - self.started > self.seconds
        self._stop = over_time or (self.max_rollouts is not None and self.rollouts >= self.max_rollouts)

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        self._record("after_rollout")

    def _on_step(self) -> bool:
        return not self._stop


def growth(samples: list[dict[str, Any]], warmup_rollouts: int) -> dict[str, float]:
    """RSS at the end of warm-up, the highest and last after it, and the growth ``max / warm-up - 1``."""
    after = [s["rss_mib"] for s in samples if s["rollout"] > warmup_rollouts]
    warm = [s["rss_mib"] for s in samples if s["rollout"] == warmup_rollouts]
    if not after or not warm:
        return {}
    base = warm[-1]
    return {
        "warmup_rss_mib": base,
        "max_rss_mib": max(after),
        "final_rss_mib": after[-1],
        "growth": max(after) / base - 1,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="rollouts and updates run this long")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--reward-model", default=defaults.reward_model, help="as in textgen train (e.g. gold)")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--warmup-rollouts", type=int, default=5, help="rollouts (with their updates) not judged")
    parser.add_argument("--max-rollouts", type=int, help="also stop after this many rollouts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/soak.py", *(sys.argv[1:] if argv is None else argv)])
    config = dataclasses.replace(
        defaults, model=args.model, reward_model=args.reward_model, max_prompt_tokens=args.max_prompt_tokens
    )

    torch.manual_seed(config.seed)
    run = build_run(config)  # what textgen train builds: envs, PPO + LoRA policy, KL penalty, metrics
    sampler = RSSSampler(args.minutes * 60, args.max_rollouts)
    started_rss = rss_mib()
    run.algo.learn(10**12, callback=run.callbacks(sampler))

    result: dict[str, Any] = {
        "command": command,
        "cpu": cpu_kind(),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
        "config": dataclasses.asdict(config),
        "rollout_tokens": config.n_envs * config.n_steps,
        "start_rss_mib": started_rss,
        "warmup_rollouts": args.warmup_rollouts,
        "rollouts": sampler.rollouts,
        "samples": sampler.samples,
        **growth(sampler.samples, args.warmup_rollouts),
        "target_growth": TARGET_GROWTH,
    }
    result["passed"] = "growth" in result and result["growth"] < TARGET_GROWTH
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(_report(result))
    print(_report(result))
    return result


def _report(result: dict[str, Any]) -> str:
    shown = "n/a (too few rollouts)" if "growth" not in result else f"{100 * result['growth']:.2f} %"
    lines = [
        "# Memory soak",
        "",
        f"Command: `{result['command']}`",
        "",
        f"CPU: {result['cpu']}; torch {result['torch']}.",
        "",
        "| measurement | value | target |",
        "|---|---|---|",
        f"| rollouts (of {result['rollout_tokens']} tokens, each with its update) | {result['rollouts']} | |",
        f"| RSS before training (MiB) | {result['start_rss_mib']:.1f} | |",
    ]
    for key, label in (("warmup_rss_mib", "RSS after warm-up"), ("max_rss_mib", "highest RSS after warm-up")):
        if key in result:
            lines.append(f"| {label} (MiB) | {result[key]:.1f} | |")
    lines.append(
        f"| growth after {result['warmup_rollouts']} warm-up rollouts | {shown} | < {100 * TARGET_GROWTH:.0f} % |"
    )
    lines += ["", "| rollout | phase | seconds | RSS (MiB) |", "|---|---|---|---|"]
    lines += [f"| {s['rollout']} | {s['phase']} | {s['seconds']:.0f} | {s['rss_mib']:.1f} |" for s in result["samples"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
