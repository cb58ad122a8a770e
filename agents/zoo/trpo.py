"""rl-zoo3 config: sb3-contrib ``TRPO`` + ``CausalLMPolicy`` on TextGen-v0.

Full fine-tuning: TRPO differentiates every policy parameter, and LoRA freezes most of them. ``learning_rate``
is the critic's (its step also moves the shared trunk, hence small); the policy step is set by ``target_kl``.
"""

from agents.buffers import EpisodeRolloutBuffer
from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="agents.policies.CausalLMPolicy",  # rl-zoo3 imports dotted names
        policy_kwargs=dict(model="default"),
        rollout_buffer_class=EpisodeRolloutBuffer,
        n_envs=16,
        n_timesteps=10240,
        n_steps=32,
        batch_size=128,
        learning_rate=1e-5,
        gamma=1.0,
        cg_max_steps=10,
        n_critic_updates=4,
        callback=CALLBACKS,
    )
}
