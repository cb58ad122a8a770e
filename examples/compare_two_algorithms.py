"""Compare two SB3 algorithms with the same LM policy, budget, KL leash and held-out prompts.

    python examples/compare_two_algorithms.py --algos ppo a2c
    python examples/compare_two_algorithms.py --algos ppo maskable_ppo   # NLPO-style top-p masks

For every method, several seeds and plots, use benchmarks/compare_algorithms.py.
"""

import argparse

from agents.run import ALGORITHMS, TrainConfig, build_run

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--algos", nargs=2, default=["ppo", "a2c"], choices=ALGORITHMS)
parser.add_argument("--model", default="default")
parser.add_argument("--reward-model", default=None)
parser.add_argument("--timesteps", type=int, default=1024)
parser.add_argument("--n-envs", type=int, default=16)
parser.add_argument("--max-new-tokens", type=int, default=None)
parser.add_argument("--max-prompt-tokens", type=int, default=None)
parser.add_argument("--eval-prompts", type=int, default=32)
args = parser.parse_args()

results = {}
for algo in args.algos:
    # Each algorithm from its preset (LoRA r=16 at lr 1e-4; TRPO: the top 2 blocks), the rest shared.
    config = TrainConfig.for_algo(
        algo, model=args.model, reward_model=args.reward_model, total_timesteps=args.timesteps, n_envs=args.n_envs,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, eval_prompts=args.eval_prompts,
    )  # fmt: skip
    run = build_run(config)  # envs (with top-p masks for maskable_ppo), algorithm, KL leash and metrics
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    results[algo] = run.evaluate().summary

print(f"{'algorithm':>14} {'reward model':>13} {'gold':>7} {'KL':>7} {'distinct-2':>11}")
for algo, s in results.items():
    print(f"{algo:>14} {s['reward_model_score']:13.3f} {s['gold_score']:7.3f} {s['kl']:7.2f} {s['distinct_2']:11.3f}")
