"""The iterated RLHF loop from Python: PPO, fresh pairs from the policy, a refitted reward model, and again.

    python examples/rlhf_loop.py                                   # 2 short rounds (~10 min on a 2-core CPU)
    python examples/rlhf_loop.py --rounds 4 --tokens-per-round 10240 --pairs-per-round 256   # textgen rlhf's defaults

The same loop as `textgen rlhf`; the simulated annotator (Bradley-Terry noise over the gold scorer) labels, so the
gold score says whether what the reward model rewards is real.
"""

import argparse

from agents.rlhf import LOOP_BETA, RLHFConfig, rlhf
from agents.run import TrainConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="default")
parser.add_argument("--reward-model", default=None, help="round 0's reward model (the task's by default) or 'gold'")
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--tokens-per-round", type=int, default=1024)
parser.add_argument("--pairs-per-round", type=int, default=64)
parser.add_argument("--n-envs", type=int, default=16)
parser.add_argument("--max-new-tokens", type=int, default=None)
parser.add_argument("--max-prompt-tokens", type=int, default=None)
parser.add_argument("--eval-prompts", type=int, default=32)
parser.add_argument("--out", default="runs")
args = parser.parse_args()

# PPO's settings are textgen train's (LoRA r=16) but the loop's looser KL leash, β = LOOP_BETA (0.05) to the base
# model; the loop adds rounds and pairs.
train = TrainConfig(
    model=args.model, reward_model=args.reward_model, n_envs=args.n_envs, max_new_tokens=args.max_new_tokens,
    max_prompt_tokens=args.max_prompt_tokens, eval_prompts=args.eval_prompts, out=args.out, beta=LOOP_BETA,
)  # fmt: skip
config = RLHFConfig(
    train, rounds=args.rounds, tokens_per_round=args.tokens_per_round, pairs_per_round=args.pairs_per_round
)
report = rlhf(config)  # saves every round in <out>/rlhf-positive-review-<time>/; rlhf(resume=that dir) continues it

# Round 0 is the base policy. After each round: the policy on held-out prompts, and how well the reward model it
# was trained on judged its fresh pairs (low: the policy went where that reward model is wrong).
print(f"\n{'round':>5} {'gold':>7} {'reward model':>13} {'KL':>7} {'previous RM accuracy on fresh pairs':>37}")
for r in report["rounds"]:
    judged = r.get("previous_reward_model_on_fresh_pairs", {}).get("accuracy")
    e = r["eval"]
    accuracy = "" if judged is None else f"{judged:.3f}"
    print(f"{r['round']:>5} {e['gold_score']:7.3f} {e['reward_model_score']:13.3f} {e['kl']:7.2f} {accuracy:>37}")
