"""The RLHF loop end to end: preference pairs -> reward model -> PPO on that reward -> evaluate with the gold.

    python examples/reward_model_then_ppo.py --pairs 200 --timesteps 1024

Labels come from a simulated human (Bradley-Terry noise over the task's gold scorer, VADER sentiment), so the
gold score tells how much of the learned reward's gain is real.
"""

import argparse
from pathlib import Path

from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from agents import CausalLMPolicy
from agents.buffers import EpisodeRolloutBuffer
from agents.evaluate import evaluate
from agents.kl import KLPenalty
from text_env import get_task, load_causal_lm, load_tokenizer, make_text_vec_env
from text_env.rewards.annotators import SimulatedAnnotator
from text_env.rewards.preferences import generate_pairs
from text_env.rewards.reward_model import RewardModelConfig
from text_env.rewards.training import train_reward_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="default")
parser.add_argument("--pairs", type=int, default=200)
parser.add_argument("--timesteps", type=int, default=1024)
parser.add_argument("--n-envs", type=int, default=16)
parser.add_argument("--max-new-tokens", type=int, default=None)
parser.add_argument("--max-prompt-tokens", type=int, default=None)
parser.add_argument("--out", default="rlhf_example")
args = parser.parse_args()
out = Path(args.out)
task = get_task("positive-review")

# 1. Preference pairs: two samples per prompt from the base LM, labelled by the simulated human (resumable).
annotator = SimulatedAnnotator(task.gold, beta=10.0)
lm, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
new_tokens = args.max_new_tokens or task.max_new_tokens
pairs = generate_pairs(
    lm,
    tokenizer,
    task.train_prompts,
    annotator,
    out / "prefs.jsonl",
    args.pairs,
    instruction=task.instruction,
    max_new_tokens=new_tokens,
)

# 2. A reward model: a linear Bradley-Terry head on the frozen LM's pooled hidden states.
reward_model, report = train_reward_model(pairs, RewardModelConfig(backbone=args.model), gold=task.gold)
reward_model.save(out / "reward_model")
print(f"reward model: held-out accuracy {report.accuracy:.3f}, vs gold {report.gold_accuracy:.3f}")

# 3. PPO on that reward, leashed to the base LM.
env_kwargs = dict(
    model=args.model,
    reward_model=out / "reward_model",
    max_new_tokens=args.max_new_tokens,
    max_prompt_tokens=args.max_prompt_tokens,
)
env = make_text_vec_env(args.n_envs, seed=0, **env_kwargs)
model = PPO(
    CausalLMPolicy,
    env,
    policy_kwargs=dict(model=args.model, lora={"r": 16}),
    n_steps=32,
    batch_size=128,
    learning_rate=1e-4,
    gamma=1.0,
    rollout_buffer_class=EpisodeRolloutBuffer,
    seed=0,
)
eval_env = make_text_vec_env(args.n_envs, seed=0, split="eval", **env_kwargs)
prompts = task.eval_prompts[:32]
before = evaluate(model.policy, eval_env, prompts)
model.learn(args.timesteps, callback=CallbackList([KLPenalty(beta=0.05)]))
after = evaluate(model.policy, eval_env, prompts)

# 4. The learned reward went up; did the gold score follow?
for key in ("reward_model_score", "gold_score", "kl"):
    print(f"{key:>20}: {before.summary[key]:7.3f} -> {after.summary[key]:7.3f}")
model.save(out / "ppo")
