"""rl-zoo3 config for ``python -m agents.zoo train --algo maskable_ppo``: NLPO-style PPO on TextGen-v0.

Actions outside the env LM's top-p (0.9) set are masked (``agents.masks.TopPMask``, a VecEnv wrapper that gives
MaskablePPO its ``action_masks()``); the policy is ``MaskableCausalLMPolicy`` with LoRA r=16.
"""

from agents.buffers import MaskableEpisodeRolloutBuffer
from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="agents.policies.MaskableCausalLMPolicy",  # rl-zoo3 imports dotted names
        policy_kwargs=dict(model="default", lora={"r": 16}),
        rollout_buffer_class=MaskableEpisodeRolloutBuffer,
        vec_env_wrapper=[{"agents.masks.TopPMask": {"top_p": 0.9}}],
        n_envs=16,
        n_timesteps=10240,
        n_steps=32,
        batch_size=128,
        n_epochs=4,
        learning_rate=1e-4,
        gamma=1.0,
        callback=CALLBACKS,
    )
}
