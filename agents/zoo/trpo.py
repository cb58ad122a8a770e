"""rl-zoo3 config: sb3-contrib TRPO + CausalLMPolicy, top 2 blocks (agents.run.PRESETS); textgen train's settings."""

from agents.zoo import hyperparams as _hyperparams

hyperparams = _hyperparams("trpo")
