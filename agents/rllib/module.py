"""``CausalLMRLModule``: RLlib's torch RLModule around the very same causal-LM actor-critic as the SB3 path.

The module holds a :class:`agents.policies.CausalLMPolicy` built from ``model_config`` (same loader: ``"default"``,
a local directory or a hub id; same LoRA, bf16, temperature/top-k/top-p and frozen reference), so the hot path is
not copied but reused:

- **exploration** (EnvRunners): the policy's KV-cached step (one new token per row per call) and Gumbel-max
  sampling; the reference model's log-probability of the sampled token is computed there too, with its own
  cache, and travels with the episode as :data:`REF_LOGP` (SB3's ``KLPenalty`` instead runs one batched reference
  pass over the finished rollout; moving this one into the KL learner connector the same way is not done yet).
- **training** (Learners): the policy's grouped forward, one pass per episode for all of its timesteps in a
  minibatch (the Learner's minibatches are whole episode chunks, :class:`agents.rllib.learner.EpisodeMinibatches`),
  giving logits and values of the same pass.

What RLlib forced to change: (1) PPO's loss reads ``ACTION_DIST_INPUTS`` of the behaviour policy even when it does
not use them (only ``use_kl_loss`` does): shipping 49,152 logits per token from every EnvRunner would cost ~100 MB
per 512-token iteration, so exploration sends a ``(B, 1)`` placeholder and ``use_kl_loss`` is refused (the RLHF
KL is in the reward instead). (2) Values reach the loss through ``Columns.EMBEDDINGS``, the only channel from
``forward_train`` to ``compute_values``: here they are the value predictions themselves. (3) Weights are synced to
EnvRunners by ``get_state``/``set_state`` every iteration: the state is the *trainable* tensors only (LoRA adapters
and the value head: a few MB instead of the whole LM), frozen weights being rebuilt from ``model_config["model"]``
as a ``model.zip`` rebuilds them from its base model; ``set_state`` empties the KV caches, which the new weights
make stale.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

from agents.policies import CausalLMPolicy

__all__ = ["MODEL_CONFIG_KEYS", "REF_LOGP", "SAMPLING_MASK", "CausalLMRLModule"]

REF_LOGP = "ref_action_logp"
"""Episode column: ``log π_ref(a_t|s_t)`` of the frozen starting model, recorded by EnvRunners with the action."""
SAMPLING_MASK = "sampling_mask"
"""Episode column, with top-k / top-p: the nucleus the action was sampled from, bit-packed ``(ceil(V / 8),)``, so
that the Learner trains on the distribution that sampled (the nucleus of its newer weights may have left it)."""

MODEL_CONFIG_KEYS = (
    "model", "bf16", "lora", "train_layers", "temperature", "top_k", "top_p", "kv_cache", "trust_remote_code",
)  # fmt: skip
"""The ``model_config`` keys the module reads: ``CausalLMPolicy``'s keyword arguments (RLlib merges its own
defaults, e.g. ``fcnet_hiddens``, into a custom module's ``model_config``; those are ignored)."""


class _RLModuleConfigNotice(logging.Filter):
    """Drop the deprecation notice of ``RLModuleConfig`` that RLlib 2.60's own ``RLModule.__init__`` logs for every
    module, one built with today's keyword constructor too (it still fills a legacy ``self.config`` for old custom
    models); every other message passes. Installed on import, so in every EnvRunner and Learner process that unpickles
    this module, where each printed it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RLModuleConfig" not in record.getMessage()


logging.getLogger("ray._common.deprecation").addFilter(_RLModuleConfigNotice())


def _no_schedule(progress_remaining: float) -> float:
    """SB3 policies build an optimizer from a learning-rate schedule; RLlib's Learner has its own and never steps
    this one (a module-level function, so that the module pickles)."""
    return 0.0


class CausalLMRLModule(TorchRLModule, ValueFunctionAPI):
    """An RLlib torch RLModule: next-token logits over the vocabulary and a value head on the LM's last hidden state.

    ``model_config`` takes :class:`~agents.policies.CausalLMPolicy`'s keywords (:data:`MODEL_CONFIG_KEYS`):
    ``model`` (required), ``lora`` (``{"r": 16}``, ``True`` or ``None``), ``bf16``, ``train_layers``,
    ``temperature``, ``top_k``, ``top_p``, ``kv_cache``, ``trust_remote_code``.

    Example:
        >>> from ray.rllib.core.rl_module.rl_module import RLModuleSpec
        >>> spec = RLModuleSpec(module_class=CausalLMRLModule, model_config={"model": "default", "lora": {"r": 16}})
    """

    def setup(self) -> None:
        settings = {k: v for k, v in (self.model_config or {}).items() if k in MODEL_CONFIG_KEYS}
        if "model" not in settings:
            raise ValueError(
                "CausalLMRLModule needs model_config={'model': ...}: 'default', a local directory or a hub id "
                "(the env's model, whose tokens the actions are)"
            )
        if not isinstance(self.action_space, spaces.Discrete):
            raise TypeError(f"CausalLMRLModule needs a Discrete action space (token ids), got {self.action_space}")
        self.policy = CausalLMPolicy(self.observation_space, self.action_space, _no_schedule, **settings)
        self.policy.optimizer = None  # RLlib's Learner owns the optimizer

    # --- RLlib's forward passes --------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward_exploration(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        obs = batch[Columns.OBS]  # {"input_ids": (B, L), "attention_mask": (B, L)}
        actions, _, logp, keep = self.policy.act(obs)  # (B,), (B, 1), (B,): KV-cached step, Gumbel-max sample
        out = {
            Columns.ACTIONS: actions,
            Columns.ACTION_LOGP: logp,
            REF_LOGP: self.policy.reference_log_prob(obs, actions),  # (B,) the reference's own KV cache
            Columns.ACTION_DIST_INPUTS: torch.zeros(actions.shape[0], 1, device=actions.device),  # (B, 1) placeholder
        }
        if keep is not None:  # top-k / top-p: the nucleus each action was sampled from travels with it to the Learner
            out[SAMPLING_MASK] = torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1))  # (B, ceil(V / 8))
        return out

    @torch.no_grad()
    def _forward_inference(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # RLlib's GetActions takes the argmax of these when not exploring: greedy decoding.
        logits = self.policy.get_distribution(batch[Columns.OBS]).distribution.logits  # (B, V)
        return {Columns.ACTION_DIST_INPUTS: logits}

    def _forward_train(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # One pass per episode: every row of a minibatch that is a prefix of another row is read from that row's pass.
        logits, values = self.policy.logits_and_values(batch[Columns.OBS])  # (B, V), (B, 1)
        keep = None
        if SAMPLING_MASK in batch:  # the nucleus that sampled, not the one of the current weights
            bits = np.asarray(batch[SAMPLING_MASK].cpu(), dtype=np.uint8)  # (B, ceil(V / 8))
            keep = torch.from_numpy(np.unpackbits(bits, axis=-1, count=logits.shape[-1]).astype(bool)).to(logits.device)
        distribution = self.policy.distribution_from_logits(logits, keep=keep)  # temperature, top-k / top-p
        return {
            Columns.ACTION_DIST_INPUTS: distribution.distribution.logits,  # (B, V) normalised log-probabilities
            Columns.EMBEDDINGS: values,  # (B, 1) the value predictions of the same pass, for compute_values
        }

    def compute_values(self, batch: dict[str, Any], embeddings: Any = None) -> torch.Tensor:
        """Values ``(B,)``: from ``forward_train``'s pass when given (``embeddings``), else a gradient-free pass (what
        GAE asks for over the whole train batch), 0 for observations without a free slot (terminal by the env's
        definition; RLlib still bootstraps from them) as ``CausalLMPolicy.predict_values`` does."""
        if embeddings is not None:
            return embeddings.squeeze(-1)
        with torch.no_grad():
            return self.policy.predict_values(batch[Columns.OBS]).squeeze(-1)

    # --- weights: only what training changes travels ------------------------------------------------------------
    def get_state(self, *args: Any, inference_only: bool = False, **kwargs: Any) -> dict[str, Any]:
        """The trainable tensors (adapters or trained blocks, value head); frozen ones come from the base model."""
        return convert_to_numpy({name: p.detach() for name, p in self.named_parameters() if p.requires_grad})

    def set_state(self, state: dict[str, Any]) -> None:
        """Load trainable tensors (a full ``state_dict`` works too); every trainable tensor must be in ``state``."""
        loaded = self.load_state_dict(convert_to_torch_tensor(state), strict=False)
        missing = sorted(set(loaded.missing_keys) & set(self.get_state()))
        if missing or loaded.unexpected_keys:
            raise ValueError(
                f"the state does not fit this module (another LM, LoRA rank or train_layers?): missing {missing[:3]}, "
                f"unexpected {loaded.unexpected_keys[:3]}"
            )
        self.policy.set_training_mode(self.policy.training)  # same mode; empties the now stale KV caches
