"""The hot path of an LM policy: next-token logits for SB3 observations, with a per-row KV cache in rollouts
and one forward pass per sequence in training.

SB3 hands a policy the whole padded observation at every step. Re-encoding it each time costs O(T) per token;
here each row keeps its keys/values in a *slot-indexed* cache (slot = position in the observation), so a step
that appends one token runs the model on that token only. Rows that do not extend the cached row by exactly
one token (a reset, a new prompt, an unrelated batch) are re-encoded from their observation: the cache is an
optimisation that never changes a result.

Rows re-encoded together usually start with the same tokens (a chat template, the task's instruction: 40 of
SmolLM2's ~60 prompt tokens on ``positive-review``). That shared prefix is encoded once, on one row, and its
keys/values are copied into every row that starts with it, for as long as the cache lives: the prompts of a
rollout's first step, the episodes restarted during it, and the ones SB3 encodes after its last step (to bootstrap
values it then discards) pay for their own tokens only. Training passes (:func:`forward_positions`) share the
prefix of their episodes the same way, with gradients flowing through the copies.

Under bf16 autocast the cache also holds the ``nn.Linear`` weights cast to bfloat16, made once per cache lifetime.
Autocast's own cast cache lasts one autocast region (here: one call, i.e. one token) and skips frozen weights
(LoRA's base, the reference model), so without this every rollout step would re-cast all weights: ~40 % of a
decode step of SmolLM2-135M at batch 16. Autocast passes an already-bf16 weight through unchanged, so results
are bit-identical.

Under bf16 on CPU, every matmul *shape* also costs memory: oneDNN compiles a kernel per shape, and two caches of 1024
entries each (PyTorch's ``LRU_CACHE_CAPACITY``, oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) keep it, 0.5-2 MB a
shape on SmolLM2's layers. Re-encodes and training passes see ever new row counts (rows x tokens): the default
``textgen train`` settings on a tiny LM grew by ~150 MB per rollout and update, without end in sight. Their
``nn.Linear`` calls therefore run on rows padded to a few sizes (:func:`text_env.models.bucketed_matmul_rows`,
which the reward model's scoring uses too); decode steps have at most ``n_envs`` rows and are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, PreTrainedModel

from text_env.models import bucketed_matmul_rows, load_frozen_causal_lm

__all__ = [
    "CachedLM",
    "adapter_layers",
    "adapters_disabled",
    "cache_keyword",
    "checkpointed_layers",
    "forward_positions",
    "functional_forward",
    "grouped_forward",
    "grouped_log_probs",
    "reference_log_probs",
    "token_log_probs",
    "valid_ends",
]

_MIN_ROWS_TO_SHARE = 2  # a training or reference pass encodes a shared prefix once only with more rows than this
_GROUP_CHUNK = 64  # rows compared at once when grouping shared prefixes (bounds memory to chunk x B x L)


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


def _first_slots(mask: torch.Tensor) -> torch.Tensor:
    """Each row's first valid slot, ``(B,)``."""
    return (mask > 0).float().argmax(1)


def _aligned_tokens(ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, room: int) -> torch.Tensor | None:
    """Each row's first ``room`` tokens ``(B, room)`` from its ``first`` valid slot; ``None`` when a row is not one
    contiguous run of valid slots (left padding, as the env makes them) or is too short."""
    lengths = (mask > 0).sum(1)
    if room < 1 or int(lengths.min()) < room or not bool((valid_ends(mask) - first == lengths).all()):
        return None
    return ids.gather(1, first[:, None] + torch.arange(room, device=ids.device))


def _agreed_length(aligned: torch.Tensor) -> int:
    """How many leading columns of ``aligned`` ``(B, room)`` hold the same token in every row."""
    agree = (aligned == aligned[:1]).all(0)  # (room,)
    return aligned.shape[1] if bool(agree.all()) else int((~agree).long().argmax())


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` in transformers 5 releases that renamed
    ``past_key_values`` (which then warns, and goes in 5.40), ``past_key_values`` in those before.

    The ``DynamicCache`` passed in is filled in place, so its keys/values are read from it, never from the output.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the transformers model
    return _cache_keyword(type(base))


def functional_forward(model: nn.Module, weights: dict[str, torch.Tensor] | None) -> Callable[..., Any]:
    """``model``'s forward run on ``weights`` (``"module.weight" -> tensor``, e.g. :class:`CachedLM`'s bf16 copies)
    in place of its own; ``model`` itself when there are none."""
    if weights is None:
        return model

    def forward(**inputs: Any) -> Any:
        # tie_weights=False: a tied LM head gets its bf16 copy while the embedding it shares stays float32
        return functional_call(model, weights, args=(), kwargs=inputs, tie_weights=False, strict=False)

    return forward


@contextlib.contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within it, the list fills with what the LM head reads: the last layer's normalised hidden states at the
    columns ``logits_to_keep`` keeps, ``(B, U, H)``. ``output_hidden_states=True`` would keep every layer's output
    at every column instead, (layers + 1) x (B, T, H) float32: 0.7 GB for a prefill of 16 rows of 600 tokens on
    SmolLM2."""
    caught: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        yield caught
    finally:
        handle.remove()


def _encode_prefix(
    forward: Callable[..., Any], model: nn.Module, tokens: torch.Tensor
) -> list[tuple[torch.Tensor, ...]]:
    """Keys and values ``(1, h_kv, k, d)`` per layer of the ``(k,)`` tokens, encoded on one row by ``forward``
    (``model`` or a functional call of it)."""
    cache = DynamicCache(config=model.config)
    forward(input_ids=tokens[None], use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return [(layer.keys, layer.values) for layer in cache.layers]


def _prefix_past(config: Any, prefix: list[tuple[torch.Tensor, ...]], first: torch.Tensor, start: int) -> DynamicCache:
    """A cache of slots ``[start, start + k)`` of every row: the shared prefix's keys/values where the row's prefix
    sits (slots before a row's ``first`` are padding, masked: any column will do). Differentiable."""
    k = prefix[0][0].shape[2]
    index = (torch.arange(start, start + k, device=first.device) - first[:, None]).clamp(0, k - 1)  # (B, k)
    cache = DynamicCache(config=config)
    for layer, (keys, values) in zip(cache.layers, prefix, strict=True):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys[0][:, index].transpose(0, 1), values[0][:, index].transpose(0, 1)
    return cache


def _forward_columns(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    weights: dict[str, torch.Tensor] | None,
    checkpoint_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_positions`' pass: logits ``(R, U, V)`` (the model's dtype) at the ``U`` distinct slots of
    ``positions`` only, the index ``(R, K)`` of each read slot among them, and hidden states ``(R, K, H)``."""
    first = _first_slots(attention_mask)  # (R,)
    room = int((positions - first[:, None]).min())  # every read slot must lie after the shared prefix
    aligned = _aligned_tokens(input_ids, attention_mask, first, room)
    # The shared prefix's own pass reads every weight once more: it pays for itself from 3 episodes on (a default
    # LoRA PPO epoch, 4 episodes per minibatch: 1.15x the floor shared, 1.24x not), not for 2 (at 2T: 1.36x shared,
    # 1.28x not; one contended thread, side by side).
    shared = _agreed_length(aligned) if aligned is not None and input_ids.shape[0] > _MIN_ROWS_TO_SHARE else 0
    start = int(first.min())
    begin = start + shared  # the first slot the main pass runs on
    past = None
    keep = torch.unique(positions)  # (U,) only these columns go through the LM head
    forward = functional_forward(model, weights)
    big = checkpoint_tokens is not None and input_ids.shape[0] * (input_ids.shape[1] - start) >= checkpoint_tokens
    with bucketed_matmul_rows(), checkpointed_layers(model) if big else contextlib.nullcontext():
        if shared:
            past = _prefix_past(model.config, _encode_prefix(forward, model, aligned[0, :shared]), first, start)
        with head_inputs(model) as hidden:
            out = forward(
                input_ids=input_ids[:, begin:],
                attention_mask=attention_mask[:, start:],
                position_ids=_position_ids(attention_mask[:, start:])[:, shared:],
                use_cache=past is not None,
                logits_to_keep=keep - begin,
                **{cache_keyword(model): past},
            )
    column = torch.searchsorted(keep, positions)  # (R, K) index into the kept columns
    index = column.unsqueeze(-1).expand(-1, -1, hidden[0].shape[-1])
    return out.logits, column, torch.gather(hidden[0], 1, index)  # hidden (R, K, H)


def _cache_state(cache: Any) -> list[tuple[Any, ...]]:
    return [(layer.is_initialized, layer.keys, layer.values) for layer in cache.layers] if cache is not None else []


def _restore_cache(cache: Any, state: list[tuple[Any, ...]]) -> None:
    for layer, (initialized, keys, values) in zip(cache.layers if cache is not None else [], state, strict=True):
        layer.is_initialized, layer.keys, layer.values = initialized, keys, values


def _replay_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The replay runs in backward, outside the forward's :func:`bucketed_matmul_rows`: it pads rows the same way."""
    return contextlib.nullcontext(), bucketed_matmul_rows()


def _checkpointed_forward(forward: Callable[..., Any], keyword: str) -> Callable[..., Any]:
    def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        cache = kwargs.get(keyword)
        state = _cache_state(cache)  # the layer appends its keys/values: the replay must start from the same cache

        def replay(hidden: torch.Tensor) -> Any:
            _restore_cache(cache, state)
            return forward(hidden, *args, **kwargs)

        return checkpoint(replay, hidden_states, use_reentrant=False, context_fn=_replay_contexts)

    return run


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder layer within it: a pass with gradients keeps each layer's input
    and recomputes the rest in backward (about one more forward), instead of holding every layer's activations.

    transformers' own ``gradient_checkpointing_enable`` drops the KV cache that a training pass's shared prompt
    prefix arrives in (:func:`_prefix_past`); here the cache stays, and each replay restores the cache the layer
    first saw, as the layer appends to it. Passes without gradients run unchanged.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    keyword = cache_keyword(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.forward = _checkpointed_forward(layer.forward, keyword)  # an instance attribute: hooks stay outside
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def forward_positions(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
    checkpoint_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass; logits and last hidden states read at ``positions`` of each row.

    Leading slots that are padding in every row are skipped, and a token prefix that all rows share (and that no
    read position falls in) is encoded once, on one row.

    :param input_ids: ``(R, E)`` token ids.
    :param attention_mask: ``(R, E)``.
    :param positions: ``(R, K)`` slot indices to read per row.
    :param weights: run on these weights instead of the model's own (:func:`functional_forward`).
    :param checkpoint_tokens: a pass with gradients over at least this many slots (rows x columns) runs under
        :func:`checkpointed_layers`; ``None``: never.
    :return: logits ``(R, K, V)`` (float32) and hidden states ``(R, K, H)``.
    """
    logits, column, hidden = _forward_columns(model, input_ids, attention_mask, positions, weights, checkpoint_tokens)
    logits = torch.gather(logits, 1, column.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (R, K, V)
    return logits.float(), hidden


def _shared_prefix_groups(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """For each row, the index of a row whose valid tokens it is a prefix of, with the longest such row chosen.

    PPO's minibatches hold many steps of the same episode: every step's observation is a prefix of the
    episode's last one, so one forward pass over that row yields all their log-probs and values.

    :return: ``(B,)`` representative row per row (a row that no longer row extends is its own representative).
    """
    b, length = ids.shape
    ends = valid_ends(mask)  # (B,)
    seq = torch.where(mask > 0, ids, torch.full_like(ids, -1))  # (B, L)
    slots = torch.arange(length, device=ids.device)
    order = ends * (b + 1) + (b - torch.arange(b, device=ids.device))  # longest first, then lowest index
    reps = torch.empty(b, dtype=torch.long, device=ids.device)
    for start in range(0, b, _GROUP_CHUNK):
        rows = slice(start, min(b, start + _GROUP_CHUNK))
        beyond = slots[None, :] >= ends[rows, None]  # (c, L) slots after each row's end do not count
        equal = (seq[rows, None, :] == seq[None, :, :]) | beyond[:, None, :]  # (c, B, L)
        covered = equal.all(-1) & (ends[None, :] >= ends[rows, None])  # (c, B) row is a prefix of column
        reps[rows] = torch.where(covered, order[None, :], torch.full_like(covered, -1, dtype=torch.long)).argmax(1)
    return reps


def _episode_reads(
    ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """How one pass per episode reads a batch of steps: each episode's longest row ``(R,)`` and the slots to read
    on it ``(R, K)``; for each row ``(B,)``, its episode's index and which of those ``K`` slots is its own."""
    reps = _shared_prefix_groups(ids, mask)  # (B,)
    unique_reps, slot_of = torch.unique(reps, return_inverse=True)  # (R,), (B,) row -> its rep's index
    ends = valid_ends(mask)  # (B,)
    members = [torch.nonzero(slot_of == r).squeeze(1) for r in range(unique_reps.numel())]
    width = max(int(m.numel()) for m in members)
    positions = torch.zeros(unique_reps.numel(), width, dtype=torch.long, device=ids.device)  # (R, K)
    column = torch.zeros_like(reps)  # (B,) which of its rep's positions a row reads
    for r, m in enumerate(members):
        positions[r, : m.numel()] = ends[m] - 1
        positions[r, m.numel() :] = ends[m[0]] - 1
        column[m] = torch.arange(m.numel(), device=ids.device)
    return unique_reps, positions, slot_of, column


def grouped_forward(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
    checkpoint_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, V)`` (float32) and hidden states ``(B, H)`` at each row's last valid slot, one pass per episode.

    The training pass of a policy (a minibatch of whole episodes, in any order): rows that are prefixes of a longer
    row (earlier steps of its episode) are read off that row's pass, and the episodes' common prompt prefix is
    encoded once (:func:`forward_positions`).

    :param ids: ``(B, L)`` token ids (SB3 observations).
    :param mask: ``(B, L)`` attention mask.
    :param weights: run on these weights instead of the model's own (:func:`functional_forward`).
    :param checkpoint_tokens: see :func:`forward_positions`.
    """
    reps, positions, slot_of, column = _episode_reads(ids, mask)
    span = int(valid_ends(mask)[reps].max())
    logits, hidden = forward_positions(
        model, ids[reps, :span], mask[reps, :span], positions, weights, checkpoint_tokens
    )
    return logits[slot_of, column], hidden[slot_of, column]  # (B, V), (B, H)


def grouped_log_probs(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    actions: torch.Tensor,
    weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``log softmax(logits)[a]`` ``(B,)`` of each row's action, from :func:`grouped_forward`'s pass: the KL
    reference's pass over a finished rollout.

    Only the log-probs are read off the LM head's output, one episode's columns at a time: the ``(B, V)`` float32
    logits and their copies cost more than the LM head itself for a rollout of SmolLM2 (49k tokens).
    """
    reps, positions, slot_of, column = _episode_reads(ids, mask)
    span = int(valid_ends(mask)[reps].max())
    logits, kept, _ = _forward_columns(model, ids[reps, :span], mask[reps, :span], positions, weights)  # (R, U, V)
    norm = torch.stack([episode.float().logsumexp(-1) for episode in logits])  # (R, U)
    at = kept[slot_of, column]  # (B,) each row's column among its episode's kept ones
    return logits[slot_of, at, actions.long()].float() - norm[slot_of, at]


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """A peft model's adapter layers (LoRA layers, ``modules_to_save`` wrappers), which :func:`adapters_disabled`
    switches; ``[]`` for any other model. Walking the model takes ~3 ms on SmolLM2: a caller that switches often
    finds them once."""
    if not hasattr(getattr(model, "base_model", None), "disable_adapter_layers"):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, layers: list[nn.Module] | None = None) -> Iterator[None]:
    """Run a peft model as its base model (LoRA switched off) inside the block; any other model as it is.

    Only each adapter layer's ``_disable_adapters`` flag is flipped (all that peft's forwards read), then restored:
    peft's ``disable_adapter_layers()`` / ``enable_adapter_layers()`` also reset every adapter weight's
    ``requires_grad``, 22 ms a switch and back on SmolLM2's 210 LoRA layers, which a rollout on merged weights paid
    at every step (0.7 s of 16 envs x 32 tokens, a tenth of the rollout). Gradient flags stay as they were.

    :param layers: the model's :func:`adapter_layers`, when the caller holds them.
    """
    layers = adapter_layers(model) if layers is None else layers
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before, strict=True):
            layer._disable_adapters = disabled


def _lora_layers(model: nn.Module) -> dict[str, Any] | None:
    """``{name: layer}`` of the model's LoRA-adapted ``nn.Linear`` layers if every adapted layer is plain LoRA
    (active adapters, no DoRA or other variant, no LoRA bias, not merged in place): what :func:`_weight_copies`
    can merge. ``None`` for a model without LoRA or with layers it cannot merge."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for layer in layers.values():
        plain = (
            type(layer) is LoraLinear
            and isinstance(layer.base_layer, nn.Linear)
            and not layer.disable_adapters
            and not layer.merged
            and all(a in layer.lora_A and a not in layer.lora_variant for a in layer.active_adapters)
            and not any(layer.lora_bias.get(a, False) for a in layer.active_adapters)
        )
        if not plain:
            return None
    return layers or None


def _weight_copies(model: nn.Module, dtype: torch.dtype | None, merge: bool) -> dict[str, torch.Tensor] | None:
    """The weights a rollout runs on, made once per cache lifetime: ``"module.weight" -> tensor``.

    - ``dtype`` (autocast's): every ``nn.Linear`` weight cast to it (autocast passes them through unchanged).
    - ``merge`` (when every LoRA layer can be merged, :func:`_lora_layers`): each LoRA layer's base weight
      replaced by ``W + s·B·A`` (peft's ``get_delta_weight``, summed over the active adapters; computed in float32,
      then cast), the adapters' own weights left out: run with :func:`adapters_disabled`, a decode step costs what
      the plain model's does.

    :return: ``None`` when there is nothing to copy (no ``dtype``, nothing merged).
    """
    layers = (_lora_layers(model) if merge else None) or {}
    copies: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if dtype is not None and isinstance(module, nn.Linear) and not (layers and ".lora_" in name):
            copies[f"{name}.weight"] = module.weight.detach().to(dtype)
    for name, layer in layers.items():
        weight = layer.base_layer.weight.detach()  # (out, in)
        merged = weight.float() + sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
        copies[f"{name}.base_layer.weight"] = merged.to(dtype or weight.dtype)
    return copies or None


class CachedLM:
    """Next-token logits and hidden states for a batch of observations, reusing keys/values between calls.

    :param model: a causal LM whose cache is a transformers ``DynamicCache`` (every decoder-only model in
        transformers 5 that does not use sliding windows).
    :param context: a context manager factory entered around every forward (autocast, disabled adapters).
    :param autocast_dtype: the dtype ``context`` autocasts to, if any: its ``nn.Linear`` weights are then cast
        once per cache lifetime rather than once per call (same results).
    :param merge_lora: run a peft LoRA model on merged weight copies ``W + s·B·A`` (made once per cache lifetime,
        in ``autocast_dtype`` if set) with its adapters switched off, instead of running every adapter at every
        step: the same function, within the rounding of the copies' dtype. Models without (mergeable) LoRA
        layers run as they are.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        context: Callable[[], Any] = contextlib.nullcontext,
        autocast_dtype: torch.dtype | None = None,
        merge_lora: bool = False,
    ) -> None:
        self.model = model
        self.context = context
        self.autocast_dtype = autocast_dtype
        self.merge_lora = merge_lora
        self.cache_keyword = cache_keyword(model)
        self.reset()

    def reset(self) -> None:
        """Forget every cached row and cast weight (call it whenever the weights may have changed)."""
        self._forget_rows()
        self.weights: dict[str, torch.Tensor] | None = None  # "module.weight" -> cast (or merged) copy
        self.merged = False  # whether the weights are LoRA-merged copies (the adapters then run switched off)
        self.adapters: list[nn.Module] = []  # the layers switched off when merged (found once per lifetime)
        self._copied = False
        self.prefix_ids: torch.Tensor | None = None  # (k,) a token prefix shared by re-encoded rows
        self.prefix_cache: list[tuple[torch.Tensor, ...]] = []  # per layer keys, values (1, h_kv, k, d)

    def _forget_rows(self) -> None:
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
        self.weight_copies()
        with self.context(), adapters_disabled(self.model, self.adapters) if self.merged else contextlib.nullcontext():
            if decode.numel():
                self._decode(decode, input_ids, old_ends)  # at most n rows: a bounded set of matmul shapes
            if prefill.numel():
                with bucketed_matmul_rows():
                    self._prefill(prefill, input_ids, attention_mask, ends)
        self.ids, self.mask = input_ids.clone(), attention_mask.clone()
        assert self.logits is not None and self.hidden is not None
        return self.logits.clone(), self.hidden.clone()

    def weight_copies(self) -> dict[str, torch.Tensor] | None:
        """The weights this cache runs the model on (``None``: the model's own), made once per cache lifetime;
        with ``merge_lora`` (when ``merged`` turns true) they run with the adapters switched off."""
        if not self._copied:
            self.merged = self.merge_lora and _lora_layers(self.model) is not None
            self.weights = _weight_copies(self.model, self.autocast_dtype, self.merged)
            self.adapters = adapter_layers(self.model) if self.merged else []
            self._copied = True
        return self.weights

    def _allocate(self, n: int, length: int, device: torch.device) -> None:
        self._forget_rows()
        self.ids = torch.zeros(n, length, dtype=torch.long, device=device)
        self.mask = torch.zeros(n, length, dtype=torch.long, device=device)

    def _prefill(self, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> None:
        """Encode rows from scratch: one forward over slots ``[start + k, end)`` (``start``: the first slot any
        row uses; ``k``: the length of their shared prefix, whose keys/values are copied in); store their
        keys/values at slots ``[start, end)``."""
        width = max(int(ends[rows].max()), 1)
        valid = mask[rows, :width] > 0  # (r, width)
        start = int(valid.any(0).float().argmax()) if valid.any() else 0  # first slot any row uses
        first = _first_slots(mask[rows])  # (r,)
        shared = self._shared_prefix(rows, ids, mask, first)
        if shared:
            cache = _prefix_past(self.model.config, self.prefix_cache, first, start)
        else:
            cache = DynamicCache(config=self.model.config)
        begin = start + shared  # the first slot this forward runs on
        last = (ends[rows] - 1).clamp(min=begin) - begin  # (r,) each row's last slot, in the forward's span
        keep = torch.unique(last)  # the LM head runs on these columns only (usually one: the prompt's end)
        with head_inputs(self.model) as hidden:
            out = self._forward(
                input_ids=ids[rows, begin:width],
                attention_mask=mask[rows, start:width],
                position_ids=_position_ids(mask[rows, start:width])[:, shared:],
                use_cache=True,
                logits_to_keep=keep,
                **{self.cache_keyword: cache},
            )
        r, column = torch.arange(rows.numel(), device=rows.device), torch.searchsorted(keep, last)
        self._store_outputs(rows, out.logits[r, column], hidden[0][r, column])  # (r, V), (r, H)
        for layer_idx, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values  # (r, h_kv, width - start, d)
            if len(self.keys) <= layer_idx:
                n, length = self.ids.shape  # type: ignore[union-attr]
                shape = (n, k.shape[1], length, k.shape[3])
                self.keys.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
            self.keys[layer_idx][rows, :, start:width] = k.to(self.keys[layer_idx].dtype)
            self.values[layer_idx][rows, :, start:width] = v.to(self.values[layer_idx].dtype)

    def _shared_prefix(self, rows: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> int:
        """Length ``k`` of a token prefix that every row starts with (at its ``first`` valid slot) and whose
        keys/values are in ``prefix_cache`` (the one held, or encoded now); 0 when there is none to share.

        Each row keeps at least its last token to encode (its logits come from it).
        """
        room = int((mask[rows] > 0).sum(1).min()) - 1
        aligned = _aligned_tokens(ids[rows], mask[rows], first, room)
        if aligned is None:
            return 0
        held = self.prefix_ids
        if held is not None and held.numel() <= room and bool((aligned[:, : held.numel()] == held).all()):
            return held.numel()
        k = _agreed_length(aligned) if rows.numel() > 1 else 0
        if k:
            self.prefix_ids = aligned[0, :k].clone()
            self.prefix_cache = _encode_prefix(self._forward, self.model, self.prefix_ids)
        return k

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
        with head_inputs(self.model) as hidden:
            out = self._forward(
                input_ids=ids[rows, slot].unsqueeze(1),  # (r, 1)
                attention_mask=torch.cat([old_mask, torch.ones_like(old_mask[:, :1])], dim=1),  # (r, L + 1)
                position_ids=old_mask.sum(1, keepdim=True),  # (r, 1)
                use_cache=True,
                **{self.cache_keyword: cache},
            )
        self._store_outputs(rows, out.logits[:, -1], hidden[0][:, -1])
        for layer_idx, layer in enumerate(cache.layers):
            self.keys[layer_idx][rows, :, slot] = layer.keys[r, :, -1].to(self.keys[layer_idx].dtype)
            self.values[layer_idx][rows, :, slot] = layer.values[r, :, -1].to(self.values[layer_idx].dtype)

    def _forward(self, **inputs: Any) -> Any:
        return functional_forward(self.model, self.weights)(**inputs)

    def _store_outputs(self, rows: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        n = self.ids.shape[0]  # type: ignore[union-attr]
        if self.logits is None or self.hidden is None:
            self.logits = torch.zeros(n, logits.shape[-1], device=logits.device)
            self.hidden = torch.zeros(n, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        self.logits[rows] = logits.float()
        self.hidden[rows] = hidden.to(self.hidden.dtype)


def reference_log_probs(
    model: str, device: torch.device | str = "cpu", cached: bool = True
) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(obs, actions) -> log π_ref(a|s)`` ``(B,)`` of the named LM (frozen, shared): the reference of policies
    that have none of their own, for the KL penalty and for evaluation alike.

    :param cached: KV-cached, for one rollout step's batch at a time (evaluation); ``False``: one
        :func:`grouped_log_probs` pass per call, for the steps of whole episodes at once (the KL penalty's pass over
        a finished rollout).
    """
    lm = load_frozen_causal_lm(model).to(device)
    cache = CachedLM(lm) if cached else None

    @torch.no_grad()
    def log_prob(obs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
        if cache is None:
            return grouped_log_probs(lm, ids, mask, actions)
        return token_log_probs(cache(ids, mask)[0], actions)

    return log_prob
