"""Training tokens/s of the RLlib engine against the SB3 path, same machine, same model and settings.

Each engine trains the same :class:`agents.run.TrainConfig` (LM, LoRA, bf16, reward model, KL leash) for the same
tokens: SB3 ``PPO.learn`` through :func:`agents.run.build_run`, and RLlib's PPO through
:func:`agents.rllib.rllib_config` on a local Ray with 1, then 2 EnvRunner processes (the Learner in this process).
Timed: the training loop (rollouts and updates) after everything is built; building (Ray start, model loads in
every process) is reported apart.

Run: ``python benchmarks/rllib_throughput.py`` (default model, ~3 minutes on 2 cores) or ``--model DIR``;
``--nodes --runners 1 2 4`` puts each EnvRunner on its own Ray node process (``ray.cluster_utils.Cluster``, as Ray's
own tests start a multi-node cluster on one machine). Each RLlib row splits its iterations into the seconds RLlib's
own timers give to sampling (EnvRunners, in parallel), the update (Learner) and the weight sync.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from agents.rllib import connect_ray, rllib_config
from agents.run import TrainConfig, build_run
from agents.train import cpu_kind


def sb3(config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    run = build_run(config, verbose=0)
    built = time.perf_counter()
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    seconds = time.perf_counter() - built
    return {"engine": "sb3", "build_s": built - started, "train_s": seconds, "tokens": run.algo.num_timesteps}


PHASES = {"sample_s": ENV_RUNNER_SAMPLING_TIMER, "update_s": LEARNER_UPDATE_TIMER, "sync_s": SYNCH_WORKER_WEIGHTS_TIMER}


def rllib(config: TrainConfig, runners: int, nodes: bool = False) -> dict[str, Any]:
    """RLlib's PPO with ``runners`` EnvRunners: on a local Ray, or (``nodes``) each on its own Ray node process of a
    ``ray.cluster_utils.Cluster`` on this machine (the head node has no CPU slot, so no EnvRunner lands there)."""
    started = time.perf_counter()
    cluster = None
    if nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(runners):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        connect_ray(cluster.address)
    else:
        connect_ray("local", num_cpus=max(2, runners))
    algo = rllib_config(config, num_env_runners=runners).build_algo()
    built = time.perf_counter()
    tokens, phases = 0, dict.fromkeys(PHASES, 0.0)
    while tokens < config.total_timesteps:
        result = algo.train()
        tokens = int(result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME])
        for name, timer in PHASES.items():  # this iteration's seconds in each phase, as RLlib timed them
            phases[name] += float(result.get(TIMERS, {}).get(timer, float("nan")))
    seconds = time.perf_counter() - built
    node_ids = {
        n
        for n in algo.env_runner_group.foreach_env_runner(
            lambda r: ray.get_runtime_context().get_node_id(), local_env_runner=False
        )
    }
    algo.stop()
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    where = f"{runners} node(s), 1 EnvRunner each" if nodes else "local Ray"
    return {
        "engine": f"rllib, {runners} env runner(s), {where}",
        "runners": runners,
        "env_runner_nodes": len(node_ids),
        "build_s": built - started,
        "train_s": seconds,
        "tokens": tokens,
        **phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="the task's by default (a tiny LM: 128)")
    parser.add_argument("--iterations", type=int, default=1, help="rollouts (iterations) per engine")
    parser.add_argument("--runners", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nodes", action="store_true", help="each EnvRunner on its own Ray node process")
    parser.add_argument("--out", default="benchmarks/results/rllib_throughput")
    args = parser.parse_args()
    torch.set_num_threads(1)  # each process one thread: the EnvRunners are the parallelism
    config = TrainConfig(
        model=args.model, n_envs=args.n_envs, n_steps=args.n_steps, batch_size=128, n_epochs=1,
        total_timesteps=args.n_envs * args.n_steps * args.iterations, max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    rows = [sb3(config)] + [rllib(config, runners, args.nodes) for runners in args.runners]
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["train_s"]
        row["ratio_to_sb3"] = row["tokens_per_s"] / (rows[0]["tokens"] / rows[0]["train_s"])
    command = "python " + " ".join(sys.argv)
    lines = [
        f"# RLlib engine vs SB3: training tokens/s\n\n`{command}`\n",
        f"{cpu_kind()}, torch {torch.__version__}, ray {ray.__version__}; one torch thread per process; model "
        f"{args.model}, LoRA r={config.lora_r}, bf16 {config.bf16}, {args.n_envs} envs x {args.n_steps} steps per "
        f"rollout, {config.n_epochs} epoch(s), {config.total_timesteps} tokens per engine.\n",
        "| engine | tokens | build s | train s | sampling s | update s | weight sync s | tokens/s | vs SB3 |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['engine']} | {r['tokens']} | {r['build_s']:.1f} | {r['train_s']:.1f} | "
            + " | ".join(f"{r[k]:.1f}" if k in r else "" for k in PHASES)
            + f" | {r['tokens_per_s']:.1f} | {r['ratio_to_sb3']:.2f}x |"
            for r in rows
        ),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "config": asdict(config), "rows": rows}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
