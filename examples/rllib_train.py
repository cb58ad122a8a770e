"""RLHF fine-tuning with Ray RLlib's PPO: the same TextGen-v0, LM policy and KL leash as `textgen train`, sampled by
EnvRunner processes (here or on a cluster), then exported for `transformers.pipeline`.

    pip install -e ".[rllib]"
    python examples/rllib_train.py                                   # local Ray, 2 EnvRunners, the embedded model
    RAY_ADDRESS=HEAD:6379 python examples/rllib_train.py --num-env-runners 64 --num-learners 8 --n-envs 512
"""

from __future__ import annotations

import argparse

from transformers import pipeline

from agents.rllib import connect_ray, export_rllib, rllib_config
from agents.run import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M), a directory or a hub id")
    parser.add_argument("--reward-model", default=None, help="'gold' or a directory (default: the task's)")
    parser.add_argument("--timesteps", type=int, default=2048, help="generated tokens to train on")
    parser.add_argument("--n-envs", type=int, default=16, help="episodes in parallel, over all EnvRunners")
    parser.add_argument("--n-steps", type=int, default=32, help="steps per env per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="episode length (the task's by default)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="the task's by default")
    parser.add_argument("--num-env-runners", type=int, default=2, help="sampling processes")
    parser.add_argument("--num-learners", type=int, default=0, help="training processes (0: this one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--save", default="rllib-checkpoint", help="where algo.save_to_path writes")
    parser.add_argument("--export", default="smollm2-positive-rllib", help="where the LM is exported")
    args = parser.parse_args()

    # 1. The run's settings: the same dataclass as `textgen train` (LoRA r=16, bf16, beta 0.1, ...).
    config = TrainConfig(
        model=args.model, reward_model=args.reward_model, total_timesteps=args.timesteps, n_envs=args.n_envs,
        n_steps=args.n_steps, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip

    # 2. Ray: $RAY_ADDRESS's cluster if set (fails in seconds if nothing answers), else a local one.
    connect_ray(num_cpus=args.num_cpus)

    # 3. RLlib's own idiom from here on: a PPOConfig (env, LM RLModule, KL-penalised Learner) to change at will.
    ppo = rllib_config(config, num_env_runners=args.num_env_runners, num_learners=args.num_learners)
    # e.g. ppo.learners(num_gpus_per_learner=1) on a GPU cluster, ppo.training(num_epochs=2), ...
    algo = ppo.build_algo()
    tokens = 0
    while tokens < config.total_timesteps:
        result = algo.train()
        tokens = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        rlhf = result["rlhf"]  # reward-model and gold score, KL per episode, beta: what textgen train logs
        print(f"{tokens} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in rlhf.items()), flush=True)
    checkpoint = algo.save_to_path(args.save)
    algo.stop()

    # 4. The trained LM (LoRA merged) as a plain transformers model.
    path = export_rllib(checkpoint, args.export)
    generate = pipeline("text-generation", model=str(path))
    print(generate("The film opens with", max_new_tokens=24, do_sample=False)[0]["generated_text"])


if __name__ == "__main__":
    main()
