"""rl-zoo3 config: PPO + CausalLMPolicy (LoRA); ``textgen train``'s settings."""

from agents.zoo import hyperparams as _hyperparams

hyperparams = _hyperparams("ppo")
