"""TextGen's learner side: SB3 policies backed by causal LMs, the KL leash, callbacks and the ``textgen`` CLI."""

from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy, export_pretrained

__all__ = ["CausalLMPolicy", "MaskableCausalLMPolicy", "export_pretrained"]
