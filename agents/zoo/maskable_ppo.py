"""rl-zoo3 config for ``python -m agents.zoo train --algo maskable_ppo``: NLPO-style PPO on TextGen-v0.

PPO's settings (``agents.zoo.ppo``), with actions outside the env LM's top-p (0.9) set masked
(``agents.masks.TopPMask``, a VecEnv wrapper that gives MaskablePPO its ``action_masks()``) and the maskable
policy and buffer.
"""

from agents.buffers import MaskableEpisodeRolloutBuffer
from agents.zoo.ppo import hyperparams as ppo

hyperparams = {
    "TextGen-v0": {
        **ppo["TextGen-v0"],
        "policy": "agents.policies.MaskableCausalLMPolicy",
        "rollout_buffer_class": MaskableEpisodeRolloutBuffer,
        "vec_env_wrapper": [{"agents.masks.TopPMask": {"top_p": 0.9}}],
    }
}
