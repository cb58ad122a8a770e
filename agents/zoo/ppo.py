"""rl-zoo3 config: ``PPO`` + ``CausalLMPolicy`` (LoRA r=16) on TextGen-v0, the settings of ``textgen train``."""

from agents.buffers import EpisodeRolloutBuffer
from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="agents.policies.CausalLMPolicy",  # rl-zoo3 imports dotted names
        policy_kwargs=dict(model="default", lora={"r": 16}),
        rollout_buffer_class=EpisodeRolloutBuffer,  # whole episodes per minibatch: one forward per sequence
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
