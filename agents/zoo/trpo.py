"""rl-zoo3 config: sb3-contrib ``TRPO`` + ``CausalLMPolicy`` on TextGen-v0.

The top 2 transformer blocks are trained in full (``train_layers=2``): sb3-contrib TRPO runs one double-backward
pass per trainable tensor, too much for every weight of the LM (or LoRA's hundreds of adapters). ``learning_rate``
is the critic's (its step also moves the shared blocks, hence small); the policy step is set by ``target_kl``.
"""

from agents.buffers import EpisodeRolloutBuffer
from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="agents.policies.CausalLMPolicy",  # rl-zoo3 imports dotted names
        policy_kwargs=dict(model="default", train_layers=2),
        rollout_buffer_class=EpisodeRolloutBuffer,
        n_envs=16,
        n_timesteps=10240,
        n_steps=32,
        batch_size=128,
        learning_rate=1e-5,
        gamma=1.0,
        cg_max_steps=5,
        n_critic_updates=2,
        callback=CALLBACKS,
    )
}
