"""The hot path of an LM policy: next-token logits for SB3 observations, with a per-row KV cache in rollouts
and one forward pass per sequence in training.

SB3 hands a policy the whole padded observation at every step. Re-encoding it each time costs O(T) per token;
here each row keeps its keys/values in a *slot-indexed* cache (slot = position in the observation), so a step
that appends one token runs the model on that token only. Rows that do not extend the cached row by exactly
one token (a reset, a new prompt, an unrelated batch) are re-encoded from their observation: the cache is an
optimisation that never changes a result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from text_env.models import load_frozen_causal_lm

__all__ = ["CachedLM", "forward_positions", "reference_log_probs", "token_log_probs", "valid_ends"]


def valid_ends(attention_mask: torch.Tensor) -> torch.Tensor:
    """One past the last valid slot of each row, shape ``(B,)``: where the next token goes."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return ((attention_mask > 0) * (slots + 1)).amax(dim=1)


def token_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[a]`` per row: logits ``(B, V)``, actions ``(B,)`` -> ``(B,)``."""
    return torch.log_softmax(logits, dim=-1).gather(1, actions.long().reshape(-1, 1)).squeeze(1)


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Left padding: a token's position is the number of valid tokens before it (what `generate` does).
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_positions(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; logits and last hidden states read at ``positions`` of each row.

    :param input_ids: ``(R, E)`` token ids.
    :param attention_mask: ``(R, E)``.
    :param positions: ``(R, K)`` slot indices to read per row.
    :return: logits ``(R, K, V)`` (float32) and hidden states ``(R, K, H)``.
    """
    keep = torch.unique(positions)  # (U,) only these columns go through the LM head
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=_position_ids(attention_mask),
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=keep,
    )
    column = torch.searchsorted(keep, positions)  # (R, K) index into the kept columns
    logits = torch.gather(out.logits, 1, column.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))  # (R, K, V)
    hidden = out.hidden_states[-1]  # (R, E, H)
    hidden = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (R, K, H)
    return logits.float(), hidden


class CachedLM:
    """Next-token logits and hidden states for a batch of observations, reusing keys/values between calls.

    :param model: a causal LM whose cache is a transformers ``DynamicCache`` (every decoder-only model in
        transformers 5 that does not use sliding windows).
    :param context: a context manager factory entered around every forward (autocast, disabled adapters).
    """

    def __init__(self, model: PreTrainedModel, context: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.model = model
        self.context = context
        self.reset()

    def reset(self) -> None:
        """Forget every cached row."""
        self.ids: torch.Tensor | None = None  # (n, L) the observations the cache holds
        self.mask: torch.Tensor | None = None  # (n, L)
        self.keys: list[torch.Tensor] = []  # per layer (n, h_kv, L, d)
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # (n, V) at each row's last valid slot
        self.hidden: torch.Tensor | None = None  # (n, H)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:return: logits ``(n, V)`` (float32) and hidden states ``(n, H)`` at each row's last valid slot."""
        input_ids, attention_mask = input_ids.long(), attention_mask.long()
        n, length = input_ids.shape
        if self.ids is None or self.ids.shape != input_ids.shape:
            self._allocate(n, length, input_ids.device)
        assert self.ids is not None and self.mask is not None
        ends, old_ends = valid_ends(attention_mask), valid_ends(self.mask)
        same = (attention_mask == self.mask).all(1) & ((input_ids == self.ids) | (attention_mask == 0)).all(1)
        grown = self.mask.clone()
        grown[torch.arange(n), old_ends.clamp(max=length - 1)] = 1
        extends = (
            (ends == old_ends + 1)
            & (old_ends > 0)
            & (attention_mask == grown).all(1)
            & ((input_ids == self.ids) | (self.mask == 0)).all(1)
        )
        decode = torch.nonzero(extends & ~same).squeeze(1)
        prefill = torch.nonzero(~extends & ~same).squeeze(1)
        with self.context():
            if decode.numel():
                self._decode(decode, input_ids, old_ends)
            if prefill.numel():
                self._prefill(prefill, input_ids, attention_mask, ends)
        self.ids, self.mask = input_ids.clone(), attention_mask.clone()
        assert self.logits is not None and self.hidden is not None
        return self.logits.clone(), self.hidden.clone()

    def _allocate(self, n: int, length: int, device: torch.device) -> None:
        self.reset()
        self.ids = torch.zeros(n, length, dtype=torch.long, device=device)
        self.mask = torch.zeros(n, length, dtype=torch.long, device=device)

    def _prefill(self, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> None:
        """Encode rows from scratch: one forward over slots ``[start, end)`` (the span any of them uses, leading
        all-padding slots skipped); store their keys/values at those slots."""
        width = max(int(ends[rows].max()), 1)
        valid = mask[rows, :width] > 0  # (r, width)
        start = int(valid.any(0).float().argmax()) if valid.any() else 0  # first slot any row uses
        last = (ends[rows] - 1).clamp(min=start) - start  # (r,) each row's last slot, in the span
        keep = torch.unique(last)  # the LM head runs on these columns only (usually one: the prompt's end)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids[rows, start:width],
            attention_mask=mask[rows, start:width],
            position_ids=_position_ids(mask[rows, start:width]),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
            logits_to_keep=keep,
        )
        r = torch.arange(rows.numel(), device=rows.device)
        logits = out.logits[r, torch.searchsorted(keep, last)]  # (r, V)
        self._store_outputs(rows, logits, out.hidden_states[-1][r, last])
        for layer_idx, layer in enumerate(out.past_key_values.layers):
            k, v = layer.keys, layer.values  # (r, h_kv, width - start, d)
            if len(self.keys) <= layer_idx:
                n, length = self.ids.shape  # type: ignore[union-attr]
                shape = (n, k.shape[1], length, k.shape[3])
                self.keys.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
            self.keys[layer_idx][rows, :, start:width] = k.to(self.keys[layer_idx].dtype)
            self.values[layer_idx][rows, :, start:width] = v.to(self.values[layer_idx].dtype)

    def _decode(self, rows: torch.Tensor, ids: torch.Tensor, old_ends: torch.Tensor) -> None:
        """Run one new token per row against the cached keys/values, then write its keys/values to its slot."""
        assert self.mask is not None
        slot = old_ends[rows]  # (r,) where the new token sits
        r = torch.arange(rows.numel(), device=rows.device)
        old_mask = self.mask[rows]  # (r, L)
        every_row = rows.numel() == old_ends.numel()  # the usual rollout step: no gather copy needed
        cache = DynamicCache(config=self.model.config)
        for layer, k, v in zip(cache.layers, self.keys, self.values, strict=True):
            layer.lazy_initialization(k, v)
            # (r, h_kv, L, d); the model appends the new column at L in a new tensor, leaving ours untouched
            layer.keys, layer.values = (k, v) if every_row else (k[rows], v[rows])
        out = self.model(
            input_ids=ids[rows, slot].unsqueeze(1),  # (r, 1)
            attention_mask=torch.cat([old_mask, torch.ones_like(old_mask[:, :1])], dim=1),  # (r, L + 1)
            position_ids=old_mask.sum(1, keepdim=True),  # (r, 1)
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self._store_outputs(rows, out.logits[:, -1], out.hidden_states[-1][:, -1])
        for layer_idx, layer in enumerate(out.past_key_values.layers):
            self.keys[layer_idx][rows, :, slot] = layer.keys[r, :, -1].to(self.keys[layer_idx].dtype)
            self.values[layer_idx][rows, :, slot] = layer.values[r, :, -1].to(self.values[layer_idx].dtype)

    def _store_outputs(self, rows: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        n = self.ids.shape[0]  # type: ignore[union-attr]
        if self.logits is None or self.hidden is None:
            self.logits = torch.zeros(n, logits.shape[-1], device=logits.device)
            self.hidden = torch.zeros(n, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        self.logits[rows] = logits.float()
        self.hidden[rows] = hidden.to(self.hidden.dtype)


def reference_log_probs(
    model: str, device: torch.device | str = "cpu"
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(obs, actions) -> log π_ref(a|s)`` of the named LM (frozen, shared, KV-cached): the reference of policies
    that have none of their own, for the KL penalty and for evaluation alike."""
    lm = CachedLM(load_frozen_causal_lm(model).to(device))

    def log_prob(obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        return token_log_probs(lm(obs["input_ids"], obs["attention_mask"])[0], actions)

    return log_prob
