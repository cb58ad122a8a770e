"""rl-zoo3 config: ``A2C`` + ``CausalLMPolicy`` (LoRA r=16) on TextGen-v0: one update per 512-token rollout."""

from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="agents.policies.CausalLMPolicy",  # rl-zoo3 imports dotted names
        policy_kwargs=dict(model="default", lora={"r": 16}),
        n_envs=16,
        n_timesteps=10240,
        n_steps=32,
        learning_rate=1e-4,
        gamma=1.0,
        callback=CALLBACKS,
    )
}
