"""Load a saved agent, write completions for your prompts, and export its LM for transformers.

python examples/generate_with_saved_agent.py runs/positive-review-ppo-*/model.zip "The film opened with"
"""

import argparse

from stable_baselines3 import PPO
from transformers import pipeline

from agents.policies import export_pretrained
from text_env import TextGenEnv

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model_zip", help="a model saved by model.save() or textgen train (model.zip)")
parser.add_argument("prompts", nargs="+")
parser.add_argument("--export", default=None, help="also write the LM here with save_pretrained")
parser.add_argument("--reward-model", default=None, help="reward-model directory or 'gold' (the task's default)")
parser.add_argument("--max-new-tokens", type=int, default=None, help="as in training (the task's default)")
parser.add_argument("--max-prompt-tokens", type=int, default=None, help="as in training (the task's default)")
args = parser.parse_args()

model = PPO.load(args.model_zip, device="cpu")
lm_name = model.policy_kwargs["model"]  # the LM the policy was built on: the env must share its tokenizer
env = TextGenEnv(model=lm_name, prompts=args.prompts, reward_model=args.reward_model,
                 max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens)  # fmt: skip

# The agent acts in the env token by token, exactly as in training.
for prompt in args.prompts:
    obs, info = env.reset(options={"prompt": prompt})
    done = False
    while not done:
        action, _ = model.predict({k: v[None] for k, v in obs.items()})
        obs, reward, terminated, truncated, info = env.step(int(action[0]))
        done = terminated or truncated
    print(f"{prompt}{info['completion']}\n  reward model {reward:+.3f}, gold {info['gold_score']:+.3f}")

# Or leave RL behind: the fine-tuned LM as a plain transformers model.
if args.export:
    export_pretrained(model.policy, args.export)
    generate = pipeline("text-generation", model=args.export)
    print(generate(args.prompts[0], max_new_tokens=20, do_sample=False)[0]["generated_text"])
