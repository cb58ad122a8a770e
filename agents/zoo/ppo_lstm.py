"""rl-zoo3 config: RecurrentPPO with a token LSTM, no LM prior (a baseline); ``textgen train``'s settings."""

from agents.zoo import hyperparams as _hyperparams

hyperparams = _hyperparams("recurrent_ppo_lstm")
