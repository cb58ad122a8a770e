"""rl-zoo3 config: sb3-contrib ``RecurrentPPO`` with a token-level LSTM on TextGen-v0 (a baseline with no LM prior).

An LSTM's state cannot carry a transformer's, so this policy learns language from scratch: it reads the last
token (``agents.baselines.LastTokenEmbedding``) and remembers the rest in its LSTM. The KL penalty leashes it
to the env's LM like every other method.
"""

from agents.baselines import LastTokenEmbedding
from agents.zoo import CALLBACKS

hyperparams = {
    "TextGen-v0": dict(
        policy="MultiInputLstmPolicy",
        policy_kwargs=dict(features_extractor_class=LastTokenEmbedding, features_extractor_kwargs=dict(embed_dim=64)),
        n_envs=16,
        n_timesteps=10240,
        n_steps=32,
        batch_size=128,
        n_epochs=4,
        learning_rate=3e-4,
        gamma=1.0,
        callback=CALLBACKS,
    )
}
