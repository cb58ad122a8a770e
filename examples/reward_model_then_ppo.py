"""The RLHF loop end to end: preference pairs -> reward model -> PPO on that reward -> evaluate with the gold.

    python examples/reward_model_then_ppo.py --pairs 200 --timesteps 1024

Labels come from a simulated human (Bradley-Terry noise over the task's gold scorer, VADER sentiment), so the
gold score tells how much of the learned reward's gain is real.
"""

import argparse
from pathlib import Path

from agents.run import TrainConfig, build_run
from text_env import get_task, load_causal_lm, load_tokenizer
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

# 3. PPO on that reward, leashed to the base LM: `textgen train`'s settings, built the same way.
config = TrainConfig(
    model=args.model, reward_model=str(out / "reward_model"), total_timesteps=args.timesteps, n_envs=args.n_envs,
    max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, eval_prompts=32,
)  # fmt: skip
run = build_run(config)  # PPO + CausalLMPolicy (LoRA), KL penalty, text metrics, train and held-out envs
before = run.evaluate()
run.algo.learn(config.total_timesteps, callback=run.callbacks())
after = run.evaluate()

# 4. The learned reward went up; did the gold score follow?
for key in ("reward_model_score", "gold_score", "kl"):
    print(f"{key:>20}: {before.summary[key]:7.3f} -> {after.summary[key]:7.3f}")
run.algo.save(out / "ppo")
