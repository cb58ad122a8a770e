"""rl-zoo3 config: MaskablePPO + top-p masks, NLPO-style (run with python -m agents.zoo); textgen train's settings."""

from agents.zoo import hyperparams as _hyperparams

hyperparams = _hyperparams("maskable_ppo")
