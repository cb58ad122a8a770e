"""TextGen's learner side: SB3 policies backed by causal LMs, the KL leash, callbacks, the run builder and the
``textgen`` CLI."""

from agents.buffers import EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer
from agents.callbacks import TextMetrics
from agents.kl import KLPenalty
from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy, export_pretrained

__all__ = [
    "CausalLMPolicy",
    "EpisodeRolloutBuffer",
    "KLPenalty",
    "MaskableCausalLMPolicy",
    "MaskableEpisodeRolloutBuffer",
    "TextMetrics",
    "export_pretrained",
]
