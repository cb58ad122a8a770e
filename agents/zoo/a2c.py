"""rl-zoo3 config: A2C + CausalLMPolicy (LoRA): one update per rollout; ``textgen train``'s settings."""

from agents.zoo import hyperparams as _hyperparams

hyperparams = _hyperparams("a2c")
