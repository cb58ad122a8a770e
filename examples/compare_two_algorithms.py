"""Compare two SB3 algorithms with the same LM policy, budget, KL leash and held-out prompts.

    python examples/compare_two_algorithms.py --algos ppo a2c
    python examples/compare_two_algorithms.py --algos ppo maskable_ppo   # NLPO-style top-p masks

For every method, several seeds and plots, use benchmarks/compare_algorithms.py.
"""

import argparse

from stable_baselines3.common.callbacks import CallbackList

from agents.evaluate import evaluate
from agents.kl import KLPenalty
from agents.masks import TopPMask
from agents.train import ALGORITHMS, TrainConfig, make_algorithm
from text_env import get_task, make_text_vec_env

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--algos", nargs=2, default=["ppo", "a2c"], choices=[a for a in ALGORITHMS if a != "trpo"])
parser.add_argument("--model", default="default")
parser.add_argument("--reward-model", default=None)
parser.add_argument("--timesteps", type=int, default=1024)
parser.add_argument("--n-envs", type=int, default=16)
parser.add_argument("--max-new-tokens", type=int, default=None)
parser.add_argument("--max-prompt-tokens", type=int, default=None)
parser.add_argument("--eval-prompts", type=int, default=32)
args = parser.parse_args()

env_kwargs = dict(
    model=args.model,
    reward_model=args.reward_model,
    max_new_tokens=args.max_new_tokens,
    max_prompt_tokens=args.max_prompt_tokens,
)
prompts = get_task("positive-review").eval_prompts[: args.eval_prompts]
results = {}
for algo in args.algos:
    config = TrainConfig(algo=algo, model=args.model, total_timesteps=args.timesteps, n_envs=args.n_envs)
    model = make_algorithm(config, make_text_vec_env(args.n_envs, seed=0, **env_kwargs))  # LoRA r=16, lr 1e-4
    model.learn(args.timesteps, callback=CallbackList([KLPenalty(beta=config.beta)]))
    eval_env = make_text_vec_env(args.n_envs, seed=0, split="eval", **env_kwargs)
    if algo == "maskable_ppo":  # evaluate under the same masks it was trained with
        eval_env = TopPMask(eval_env, top_p=config.mask_top_p)
    results[algo] = evaluate(model.policy, eval_env, prompts).summary

print(f"{'algorithm':>14} {'reward model':>13} {'gold':>7} {'KL':>7} {'distinct-2':>11}")
for algo, s in results.items():
    print(f"{algo:>14} {s['reward_model_score']:13.3f} {s['gold_score']:7.3f} {s['kl']:7.2f} {s['distinct_2']:11.3f}")
