"""Train stock SB3 PPO with the causal-LM policy on TextGen-v0, save it, load it back, evaluate.

python examples/train_ppo.py                     # embedded SmolLM2-135M, ~4 min on a 2-core CPU
python examples/train_ppo.py --timesteps 10240   # what `textgen train` does (~16 min)
"""

import argparse

from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from agents import CausalLMPolicy
from agents.buffers import EpisodeRolloutBuffer
from agents.callbacks import TextMetrics
from agents.evaluate import evaluate
from agents.kl import KLPenalty
from text_env import get_task, make_text_vec_env

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="default", help="'default', a local directory or a hub id")
parser.add_argument("--reward-model", default=None, help="reward-model directory or 'gold' (the task's default)")
parser.add_argument("--timesteps", type=int, default=2048, help="environment steps = generated tokens")
parser.add_argument("--n-envs", type=int, default=16)
parser.add_argument("--max-new-tokens", type=int, default=None)
parser.add_argument("--max-prompt-tokens", type=int, default=None)
parser.add_argument("--eval-prompts", type=int, default=32)
parser.add_argument("--save", default="ppo_textgen")
args = parser.parse_args()

# 16 episodes side by side; their rewards come from the task's learned reward model.
env_kwargs = dict(
    model=args.model,
    task="positive-review",
    reward_model=args.reward_model,
    max_new_tokens=args.max_new_tokens,
    max_prompt_tokens=args.max_prompt_tokens,
)
env = make_text_vec_env(args.n_envs, seed=0, **env_kwargs)
eval_env = make_text_vec_env(args.n_envs, seed=0, split="eval", **env_kwargs)
prompts = get_task("positive-review").eval_prompts[: args.eval_prompts]

model = PPO(
    CausalLMPolicy,
    env,
    policy_kwargs=dict(model=args.model, lora={"r": 16}),  # LoRA: the reference is the base, adapters off
    rollout_buffer_class=EpisodeRolloutBuffer,  # whole episodes per minibatch: one forward per sequence
    n_steps=32,
    batch_size=128,
    n_epochs=4,
    learning_rate=1e-4,
    gamma=1.0,
    seed=0,
)
before = evaluate(model.policy, eval_env, prompts)

# RLHF's objective: reward-model score - beta * KL(policy || reference), as a per-token reward penalty.
model.learn(args.timesteps, callback=CallbackList([KLPenalty(beta=0.1), TextMetrics()]), progress_bar=True)
model.save(args.save)

model = PPO.load(args.save, env=env)  # policy_kwargs are JSON-able: the LM is rebuilt, the weights restored
after = evaluate(model.policy, eval_env, prompts)
for key in ("reward_model_score", "gold_score", "kl", "distinct_2"):
    print(f"{key:>20}: {before.summary[key]:7.3f} -> {after.summary[key]:7.3f}")
print(f"\n{prompts[0]}\n  before: {before.completions[0]}\n  after:  {after.completions[0]}")
