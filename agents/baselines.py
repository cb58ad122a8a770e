"""Baselines without an LM prior: SB3 features extractors that read TextGen observations from scratch.

They answer "how much does the pretrained LM matter?": the same env, algorithm and KL leash
(``KLPenalty(reference=...)``), but a policy that starts knowing nothing about language.

Example:
    >>> from sb3_contrib import RecurrentPPO
    >>> from stable_baselines3 import PPO
    >>> lstm = RecurrentPPO("MultiInputLstmPolicy", env, policy_kwargs=dict(
    ...     features_extractor_class=LastTokenEmbedding, features_extractor_kwargs=dict(embed_dim=64)))
    >>> bag = PPO("MultiInputPolicy", env, policy_kwargs=dict(features_extractor_class=BagOfTokens))
"""

from __future__ import annotations

import torch
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from agents.cached_lm import valid_ends

__all__ = ["BagOfTokens", "LastTokenEmbedding"]


def _vocab_size(observation_space: spaces.Dict) -> int:
    if not isinstance(observation_space, spaces.Dict) or "input_ids" not in observation_space.spaces:
        raise TypeError("needs Dict observations with 'input_ids' and 'attention_mask' (TextGen-v0)")
    return int(observation_space["input_ids"].high.max()) + 1  # type: ignore[attr-defined]


def _last_tokens(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token id at each row's last valid slot, ``(B,)``."""
    last = (valid_ends(mask) - 1).clamp(min=0)  # (B,)
    return ids.gather(1, last.unsqueeze(1)).squeeze(1)  # (B,)


class LastTokenEmbedding(BaseFeaturesExtractor):
    """Embedding of the last valid token only: the per-step input of a token-level recurrent policy.

    For ``sb3_contrib.RecurrentPPO("MultiInputLstmPolicy", ...)``, whose LSTM carries the history; an LM cannot
    be that policy, because RecurrentPPO's state must be an LSTM's ``(h, c)``, not a KV cache.

    :param embed_dim: size of the token embedding (the features size).
    """

    def __init__(self, observation_space: spaces.Dict, embed_dim: int = 64) -> None:
        super().__init__(observation_space, features_dim=embed_dim)
        self.embedding = nn.Embedding(_vocab_size(observation_space), embed_dim)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = observations["input_ids"].long(), observations["attention_mask"].long()  # (B, L); SB3 gives floats
        return self.embedding(_last_tokens(ids, mask))  # (B, D)


class BagOfTokens(BaseFeaturesExtractor):
    """Mean embedding of the valid tokens, concatenated with the last token's embedding: a feed-forward
    policy's whole view of the text (order-blind except for where it stands now).

    :param embed_dim: size of the token embedding; the features are ``2 * embed_dim``.
    """

    def __init__(self, observation_space: spaces.Dict, embed_dim: int = 64) -> None:
        super().__init__(observation_space, features_dim=2 * embed_dim)
        self.embedding = nn.Embedding(_vocab_size(observation_space), embed_dim)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = observations["input_ids"].long(), observations["attention_mask"].long()  # (B, L); SB3 gives floats
        weights = mask.unsqueeze(-1).float()  # (B, L, 1)
        mean = (self.embedding(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, D)
        last = self.embedding(_last_tokens(ids, mask))  # (B, D)
        return torch.cat([mean, last], dim=-1)  # (B, 2D)
