"""SB3 actor-critic policies backed by a Hugging Face causal LM.

``CausalLMPolicy`` plugs into unmodified SB3 algorithms (``PPO``, ``A2C``, ``sb3_contrib.TRPO``);
``MaskableCausalLMPolicy`` into ``sb3_contrib.MaskablePPO``. Both share :class:`_CausalLMMixin`.

Example:
    >>> from stable_baselines3 import PPO
    >>> from agents import CausalLMPolicy
    >>> model = PPO(CausalLMPolicy, env, learning_rate=1e-5)  # the env's LM; or policy_kwargs=dict(model=...)
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from agents.cached_lm import CachedLM, adapters_disabled, grouped_forward, grouped_log_probs, token_log_probs
from agents.masks import top_p_mask
from text_env.models import (
    DEFAULT_BF16,
    ModelLoadError,
    load_causal_lm,
    load_frozen_causal_lm,
    load_tokenizer,
    lora_model,
    resolve_model,
)

__all__ = ["LORA_DEFAULTS", "CausalLMPolicy", "MaskableCausalLMPolicy", "export_pretrained", "release_free_heap"]

_FRAMES_TO_ALGORITHM = 8  # the policy's __init__ chain up to the algorithm's _setup_model, with room to spare
# Training passes from this many token slots on are checkpointed: a default code-task minibatch (4 or more episodes
# of up to ~200 prompt tokens + 128) or summarize-docstring one (prompts up to 320) is, a positive-review one (4
# episodes of at most 72 + 32) is not.
CHECKPOINT_TOKENS = 1024
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (the one with ``malloc_trim``), else ``None`` (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Rollouts and updates allocate differently shaped tensors in turn, and glibc keeps the pages they free: after an
    update of the default job ~1.3 GB sits free inside the heap, so the resident set swings by hundreds of MB and
    creeps up as the heap fragments (``benchmarks/soak.py``). Trimming at each switch costs milliseconds.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _building_algorithm() -> BaseAlgorithm | None:
    """The SB3 algorithm constructing a policy right now: the ``self`` of a frame up the stack (its ``_setup_model``
    calls ``policy_class(observation_space, action_space, lr_schedule, **policy_kwargs)``); ``None`` outside one."""
    frame = inspect.currentframe()
    try:
        for _ in range(_FRAMES_TO_ALGORITHM):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, BaseAlgorithm):
                return owner
        return None
    finally:
        del frame  # a frame holds its locals: no reference cycle


def _differentiates_twice(algorithm: BaseAlgorithm | None) -> bool:
    """Whether ``algorithm`` differentiates the policy's pass twice: sb3-contrib TRPO (its Hessian-vector
    products); recognised by that method, so a subclass counts too."""
    return callable(getattr(algorithm, "hessian_vector_product", None))


def _env_model(env: VecEnv | None) -> str | None:
    """The ``model_name`` a TextGen env (vectorised, wrapped or not) was built on; ``None`` for other envs."""
    if env is None:
        return None
    try:
        return os.fspath(env.get_attr("model_name")[0])
    except AttributeError:
        return None


def _refuse_normalised_token_ids(env: VecEnv | None) -> None:
    """``VecNormalize(norm_obs=True)`` turns token ids into floats that no longer name tokens."""
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, VecNormalize) and env.norm_obs:
            keys = env.norm_obs_keys if env.norm_obs_keys is not None else ["input_ids", "attention_mask"]
            if {"input_ids", "attention_mask"} & set(keys):
                raise ValueError(
                    "VecNormalize(norm_obs=True) normalises the token ids an LM policy reads: wrap the env with "
                    "VecNormalize(env, norm_obs=False, norm_reward=True) to normalise rewards only"
                )
        env = env.venv


def _lora_settings(lora: dict[str, Any] | bool | None) -> dict[str, Any] | None:
    """``lora`` as ``peft.LoraConfig`` keywords over :data:`LORA_DEFAULTS` (``True``: the defaults; ``False``:
    none)."""
    if lora is None or lora is False:
        return None
    if lora is True:
        return {}
    if not isinstance(lora, dict):
        raise TypeError(
            f"lora takes a dict of peft.LoraConfig keyword arguments (e.g. {{'r': 16}}) or True, got {lora!r}"
        )
    return lora


_EMA_PREFIX = "_reference."  # state_dict keys of the moving reference (reference_ema)


def _token_ids(obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask ``(B, L)`` as integers (SB3's buffers store observations as floats), checked."""
    ids, mask = obs["input_ids"], obs["attention_mask"]  # type: ignore[index]
    if ids.is_floating_point() and not torch.equal(ids, ids.round()):
        raise ValueError(
            "the observations' input_ids are not token ids (not integers; normalised?): normalise rewards only, "
            "with VecNormalize(env, norm_obs=False, norm_reward=True)"
        )
    empty = torch.nonzero(mask.sum(1) == 0).flatten()
    if empty.numel():
        raise ValueError(f"observation rows {empty.tolist()} hold no token (an empty prompt?): every row needs one")
    return ids.long(), mask.long()


def _row_keys(obs: PyTorchObs) -> list[bytes]:
    """One key per observation row: its token ids and attention mask as bytes (the same whether SB3 passes the
    rollout's int64 arrays or the buffer's float copies)."""
    ids, mask = _token_ids(obs)  # (B, L)
    rows = torch.cat([ids, mask], dim=1).cpu().numpy()  # (B, 2L) int64
    return [row.tobytes() for row in rows]


def _sample(distribution: Distribution) -> torch.Tensor:
    """Draw from the categorical distribution by the Gumbel-max trick.

    The same distribution as ``torch.multinomial``, which on a CPU costs more than a decode step's attention
    over a 49k-token vocabulary.
    """
    logits = distribution.distribution.logits  # type: ignore[attr-defined]  # (B, V) normalised, masks applied
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)  # (B, V)
    return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)  # (B,)


class _CausalLMMixin:
    """The shared implementation: LM actor, value head on the LM's last hidden state, KV-cached rollouts.

    :param model: ``"default"`` (embedded SmolLM2-135M-Instruct), a local directory or a hub id; ``None``: the LM
        of the env (its ``model_name``), whose tokens the actions are. SB3 builds a policy from the spaces alone, so
        the policy finds the algorithm building it up the call stack (SB3's ``_setup_model``) and asks its env, as
        ``KLPenalty`` and ``TopPMask`` do; the name is then written into the algorithm's ``policy_kwargs``, so that
        ``model.zip`` names the LM. A policy on another LM must share the env's tokenizer (checked when the
        algorithm has an env: same vocabulary size, same tokens).
    :param bf16: run forward and backward passes under bfloat16 autocast (weights stay float32).
    :param temperature: the policy samples from ``softmax(logits / temperature)``; PPO's ratio uses the same.
    :param top_k: keep only the ``top_k`` most likely tokens (0: all).
    :param top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: all).
    :param kv_cache: reuse keys/values across rollout steps (exact; turn off only to compare).
    :param lora: ``None`` for full fine-tuning, or ``peft.LoraConfig`` keyword arguments (e.g. ``{"r": 16}``) over
        the defaults ``r=16, lora_alpha=32, target_modules="all-linear"``; ``True`` means those defaults. The
        reference model is then the same network with adapters disabled (no second copy).
    :param train_layers: fine-tune only the last ``train_layers`` transformer blocks (and the final norm);
        ``None``: every weight (or the adapters, with ``lora``). What sb3-contrib TRPO needs on a real LM: it
        runs one double-backward pass per trainable tensor, which for all of SmolLM2 took more than 24 GB.
    :param checkpoint_tokens: a training pass over at least this many token slots (episodes x their padded length)
        keeps only each decoder layer's input and recomputes the rest in backward
        (:func:`~agents.cached_lm.checkpointed_layers`): same gradients, bit for bit, for ~1.5x the pass's time
        (1.45x on a code-task minibatch, ``benchmarks/activation_checkpointing.py``), where long prompts would
        otherwise hold GBs of activations. ``None``: never. Not under TRPO, whose Fisher-vector products
        differentiate the pass twice.
    :param reference_ema: 0: the KL reference is the starting model, frozen. τ > 0: the reference is a copy of
        it that follows the policy as an exponential moving average of the weights, ``ref ← (1 − τ)·ref + τ·W``
        after every update (:meth:`follow_policy`; with LoRA ``W`` is the merged ``W₀ + s·B·A``), one of what
        made PPO win in Xu et al. (2024). The copy is saved with the policy (``state_dict``), so a resumed run
        goes on from it.
    :param trust_remote_code: passed to ``from_pretrained``.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        model: str | os.PathLike[str] | None = None,
        bf16: bool = DEFAULT_BF16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        kv_cache: bool = True,
        lora: dict[str, Any] | bool | None = None,
        train_layers: int | None = None,
        checkpoint_tokens: int | None = CHECKPOINT_TOKENS,
        reference_ema: float = 0.0,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        lora = _lora_settings(lora)
        if not 0 <= reference_ema <= 1:
            raise ValueError(f"reference_ema is a weight in [0, 1] (0: a fixed reference), got {reference_ema}")
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"an LM policy needs a Discrete action space (token ids), got {action_space}")
        if not isinstance(observation_space, spaces.Dict) or "input_ids" not in observation_space.spaces:
            raise TypeError("an LM policy needs Dict observations with 'input_ids' and 'attention_mask' (TextGen-v0)")
        if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0")
        if train_layers is not None and lora is not None:
            raise ValueError("lora and train_layers are alternatives: adapters everywhere, or the top blocks in full")
        algorithm = _building_algorithm()
        env = algorithm.env if algorithm is not None else None
        _refuse_normalised_token_ids(env)
        self.env_model = _env_model(env)  # for the checks in _build; None when built without a TextGen env
        if model is None:
            if self.env_model is None:
                raise ValueError(
                    "no model given and no TextGen env to take it from: pass policy_kwargs=dict(model=...) "
                    "('default', a local directory or a hub id; the env's model_name)"
                )
            model = self.env_model
            assert algorithm is not None
            algorithm.policy_kwargs = {**algorithm.policy_kwargs, "model": model}  # saved in model.zip
        self.lm_name = os.fspath(model)
        self._check_base_model(algorithm)
        self._check_tokenizer(env, trust_remote_code)
        self.bf16, self.temperature, self.top_k, self.top_p = bf16, temperature, top_k, top_p
        self.kv_cache, self.lora, self.trust_remote_code = kv_cache, lora, trust_remote_code
        self.train_layers, self.checkpoint_tokens, self.reference_ema = train_layers, checkpoint_tokens, reference_ema
        self.double_backward = _differentiates_twice(algorithm)
        self._sampled: dict[bytes, np.ndarray] = {}  # observation -> bit-packed nucleus it was sampled under
        self._floor: list[float] = []  # -log kept mass of each rollout step (with top-k / top-p)
        kwargs["ortho_init"] = False  # orthogonal init would wipe the pretrained weights
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)  # type: ignore[call-arg]

    # --- construction ----------------------------------------------------------------------------------------
    def _check_base_model(self, algorithm: BaseAlgorithm | None) -> None:
        """A missing base model most often means a ``model.zip`` whose base model moved: say how to point at it."""
        try:
            resolve_model(self.lm_name)
        except ModelLoadError as err:
            saved = {**(algorithm.policy_kwargs if algorithm is not None else {}), "model": "NEW_PATH"}
            loader = type(algorithm).__name__ if algorithm is not None else "PPO"
            raise ModelLoadError(
                f"the policy's base model {self.lm_name!r} was not found. A model.zip stores the path of the base "
                "model it was trained from (the zip holds the trained weights; the architecture, the tokenizer and, "
                "without LoRA, the KL reference come from the base model): if it moved, load with "
                f"{loader}.load(path, env=env, custom_objects={{'policy_kwargs': {saved!r}}}), or put it back at "
                f"{self.lm_name!r}"
            ) from err

    def _check_tokenizer(self, env: VecEnv | None, trust_remote_code: bool) -> None:
        """An LM on another tokenizer would read the env's token ids as different tokens."""
        if self.env_model is None or resolve_model(self.env_model) == resolve_model(self.lm_name):
            return
        env_tokens = env.get_attr("tokenizer")[0].get_vocab()  # type: ignore[union-attr]
        tokens = load_tokenizer(self.lm_name, trust_remote_code=trust_remote_code).get_vocab()
        if tokens != env_tokens:
            raise ValueError(
                f"the policy's LM {self.lm_name!r} has another tokenizer ({len(tokens)} tokens) than the env's LM "
                f"{self.env_model!r} ({len(env_tokens)} tokens): its actions would be other tokens. Build the env "
                "on the policy's LM, or omit policy_kwargs['model'] to use the env's"
            )

    def _build(self, lr_schedule: Schedule) -> None:
        lm = load_causal_lm(self.lm_name, trust_remote_code=self.trust_remote_code)
        vocab = lm.get_output_embeddings().weight.shape[0]
        if vocab != self.action_space.n:  # type: ignore[attr-defined]
            env = f"the env's LM {self.env_model!r}" if self.env_model is not None else "the env"
            raise ValueError(
                f"the policy's LM {self.lm_name!r} has {vocab} output tokens but {env} has "
                f"{self.action_space.n} actions (tokens): the policy must use the env's tokenizer and vocabulary"  # type: ignore[attr-defined]
            )
        if self.lora is not None:
            try:
                lm = lora_model(lm, **{**LORA_DEFAULTS, **self.lora})
            except TypeError as err:
                raise TypeError(f"lora takes peft.LoraConfig keyword arguments, e.g. {{'r': 16}}: {err}") from err
            self._reference_lm = None  # adapters disabled = the base model
        if self.reference_ema:  # a private copy that moves (the shared frozen one must never change)
            reference = load_causal_lm(self.lm_name, trust_remote_code=self.trust_remote_code).requires_grad_(False)
            self.__dict__["_reference_lm"] = reference.eval()
        elif self.lora is None:
            # The pretrained weights, frozen and shared (e.g. with a head-only reward model's backbone); not a
            # submodule, so it is not trained, not saved with the policy, and not among TRPO's actor parameters.
            self.__dict__["_reference_lm"] = load_frozen_causal_lm(self.lm_name, self.trust_remote_code)
        if self.train_layers is not None:
            decoder = lm.get_decoder()
            blocks = decoder.layers
            if not 1 <= self.train_layers <= len(blocks):
                raise ValueError(
                    f"train_layers must be in [1, {len(blocks)}] for {self.lm_name}, got {self.train_layers}"
                )
            lm.requires_grad_(False)
            for module in [*blocks[-self.train_layers :], getattr(decoder, "norm", None)]:
                if module is not None:
                    module.requires_grad_(True)
        self.lm = lm
        hidden = lm.get_output_embeddings().weight.shape[1]
        self.value_head = nn.Linear(hidden, 1)  # "value" in the name: TRPO's actor step skips it
        nn.init.normal_(self.value_head.weight, std=1.0 / hidden)
        nn.init.zeros_(self.value_head.bias)
        cast = torch.bfloat16 if self.bf16 else None
        # LoRA: rollouts run on merged copies W + s·B·A (adapters off), as fast as the plain model
        self._actor_cache = CachedLM(self.lm, self._autocast, autocast_dtype=cast, merge_lora=self.lora is not None)
        self._reference_cache = CachedLM(self._reference_model(), self._reference_context, autocast_dtype=cast)
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer_class, kwargs = self.optimizer_settings()
        self.optimizer = optimizer_class(trainable, lr=lr_schedule(1), **kwargs)  # type: ignore[call-arg]

    def optimizer_settings(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The optimizer class and keyword arguments (learning rate aside) this policy trains with: SB3's (Adam,
        ε 1e-5), fused; the RLlib Learner builds the same (``agents.rllib.RLHFPPOLearner``)."""
        kwargs = dict(self.optimizer_kwargs)  # type: ignore[attr-defined]
        if self.optimizer_class in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(kwargs):  # type: ignore[attr-defined]
            # One kernel over all tensors. On CPU torch otherwise loops over them one by one: an Adam step of every
            # SmolLM2 weight took 1.6 s against 0.4 s fused, LoRA's 420 adapter tensors 98 ms against 27 ms.
            kwargs["fused"] = True
        return self.optimizer_class, kwargs  # type: ignore[attr-defined]

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        data.update(
            model=self.lm_name, bf16=self.bf16, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            kv_cache=self.kv_cache, lora=self.lora, train_layers=self.train_layers,
            checkpoint_tokens=self.checkpoint_tokens, reference_ema=self.reference_ema,
            trust_remote_code=self.trust_remote_code,
        )  # fmt: skip
        return data

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters training may change: frozen LM weights (LoRA's base, blocks below ``train_layers``) are
        left out, as sb3-contrib TRPO differentiates every parameter it is given (``state_dict`` keeps them all)."""
        for name, param in super().named_parameters(*args, **kwargs):  # type: ignore[misc]
            if param.requires_grad:
                yield name, param

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)  # type: ignore[attr-defined]

    def _reference_model(self) -> nn.Module:
        return self.lm if self._reference_lm is None else self._reference_lm

    @contextlib.contextmanager
    def _reference_context(self) -> Iterator[None]:
        # LoRA's base is the reference (without a copy of its own): the same network with its adapters switched off
        shared = self.lora is not None and self._reference_lm is None
        with adapters_disabled(self.lm) if shared else contextlib.nullcontext(), self._autocast():
            yield

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # .to(device) moves the unregistered reference too
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        if self.__dict__.get("_reference_lm") is not None:
            self._reference_lm._apply(fn, *args, **kwargs)
        self._reset_caches()  # their keys/values and weight copies stay where they were
        return result

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:  # SB3's set_parameters / load
        state_dict = dict(state_dict)
        moved = {k.removeprefix(_EMA_PREFIX): state_dict.pop(k) for k in list(state_dict) if k.startswith(_EMA_PREFIX)}
        if moved and not self.reference_ema:
            raise ValueError("these weights carry a moving KL reference (reference_ema > 0); this policy has none")
        if moved:
            self._reference_lm.load_state_dict(moved)
        result = super().load_state_dict(state_dict, *args, **kwargs)  # type: ignore[misc]
        self._reset_caches()
        return result

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The policy's own tensors, and with ``reference_ema`` the moving reference's, under ``_reference.``."""
        state = super().state_dict(*args, **kwargs)  # type: ignore[misc]
        if self.reference_ema:
            for name, tensor in self._reference_lm.state_dict().items():
                state[_EMA_PREFIX + name] = tensor
        return state

    @torch.no_grad()
    def follow_policy(self) -> None:
        """One step of the moving reference toward the policy: ``ref ← (1 − τ)·ref + τ·W`` for every weight (LoRA
        layers at their merged ``W₀ + s·B·A``), τ = ``reference_ema``; its caches then go, as they are stale."""
        if not self.reference_ema:
            raise ValueError("follow_policy needs reference_ema > 0: the reference is fixed")
        tau = self.reference_ema
        reference = dict(self._reference_lm.named_parameters())
        if self.lora is not None:
            for name, module in self.lm.named_modules():
                if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                    key = name.removeprefix("base_model.model.") + ".weight"
                    merged = module.base_layer.weight + module.get_delta_weight("default")
                    reference[key].lerp_(merged.to(reference[key].dtype), tau)
        else:
            for name, param in super().named_parameters():  # type: ignore[misc]  # the trained ones: frozen stay equal
                if name.startswith("lm.") and param.requires_grad:
                    reference[name.removeprefix("lm.")].lerp_(param.detach(), tau)
        self._reset_caches()

    def _reset_caches(self) -> None:
        for cache in (self.__dict__.get("_actor_cache"), self.__dict__.get("_reference_cache")):
            if cache is not None:
                cache.reset()
        self.__dict__["_frozen_copies"] = None

    def _frozen_weights(self) -> dict[str, torch.Tensor] | None:
        """bf16 copies of the frozen ``nn.Linear`` weights (LoRA's base, the blocks below ``train_layers``) that
        training passes run on, made once per update phase (they go with the caches at the next
        ``set_training_mode``). Autocast's cast cache skips weights that need no gradient, so without them every
        forward of an update re-cast all of LoRA's base weights; autocast passes a bf16 weight through unchanged,
        so the results are bit-identical."""
        if not self.bf16:
            return None
        if self.__dict__.get("_frozen_copies") is None:
            self.__dict__["_frozen_copies"] = {
                f"{name}.weight": module.weight.detach().to(torch.bfloat16)
                for name, module in self.lm.named_modules()
                if isinstance(module, nn.Linear) and not module.weight.requires_grad
            }
        return self.__dict__["_frozen_copies"] or None

    # --- the forward passes ----------------------------------------------------------------------------------
    def _use_cache(self, cache: CachedLM, ids: torch.Tensor, frozen: bool = False) -> bool:
        """Whether a batch goes through ``cache``: rollouts and evaluation only.

        Eval mode and no autograd: weights are fixed until the next ``set_training_mode``, which empties the cache
        (TRPO's line search changes weights under ``no_grad`` in training mode and must see them). And the batch
        shape the cache holds: a lone terminal observation's value must not evict the rollout's rows.
        """
        held = cache.ids
        fixed = frozen or (not self.training and not torch.is_grad_enabled())  # type: ignore[attr-defined]
        return self.kv_cache and fixed and (held is None or held.shape == ids.shape)

    def _attention(self) -> contextlib.AbstractContextManager:
        """PyTorch's choice of attention kernel, except under TRPO: the math kernel, as its Fisher-vector products
        differentiate this pass twice, which the fused kernels (flash, memory-efficient) do not support. The math
        kernel keeps the (heads, L, L) attention matrices for the backward pass: a PPO epoch of the code task's
        run (observations up to 267 tokens) took 1.17x the time and 1.4 GB more with it; at the default task's
        ~100 tokens the two are alike (benchmarks/results/attention_kernel_*.md)."""
        return sdpa_kernel(SDPBackend.MATH) if self.double_backward else contextlib.nullcontext()

    def logits_and_values(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits ``(B, V)`` and values ``(B, 1)`` for a batch of observations."""
        ids, mask = _token_ids(obs)  # (B, L)
        if self._use_cache(self._actor_cache, ids):
            logits, hidden = self._actor_cache(ids, mask)  # (B, V), (B, H)
        else:
            with self._autocast(), self._attention():
                checkpoint = None if self.double_backward else self.checkpoint_tokens
                logits, hidden = grouped_forward(self.lm, ids, mask, self._frozen_weights(), checkpoint)
        values = self.value_head(hidden.float())  # (B, 1)
        return logits, values

    @property
    def filters(self) -> bool:
        """Whether sampling keeps only part of the vocabulary (``top_k`` or ``top_p < 1``)."""
        return bool(self.top_k or self.top_p < 1.0)

    def distribution_from_logits(
        self, logits: torch.Tensor, action_masks: Any = None, keep: torch.Tensor | None = None
    ) -> Distribution:
        """The sampling distribution: temperature, then top-k / top-p filtering, then the env's action mask.

        :param keep: ``(B, V)`` the tokens top-k / top-p kept (what sampled, :meth:`sampling_masks`); default: the
            nucleus of these logits.
        """
        if self.temperature != 1.0:
            logits = logits / self.temperature  # (B, V)
        if self.filters:
            keep = top_p_mask(logits, self.top_p, self.top_k) if keep is None else keep
            logits = logits.masked_fill(~keep, float("-inf"))
        distribution = self.action_dist.proba_distribution(action_logits=logits)  # type: ignore[attr-defined]
        if action_masks is not None:
            distribution.apply_masking(action_masks)
        return distribution

    # --- what sampled: the nucleus of each rollout step, kept for training ---------------------------------------
    def _nucleus(self, obs: PyTorchObs, logits: torch.Tensor, record: bool) -> torch.Tensor:
        """The tokens top-k / top-p keep ``(B, V)`` of a step's logits. With ``record`` (a rollout step), also kept,
        bit-packed and keyed by the observation, so that training evaluates the step's action under the
        distribution that sampled it, not under the nucleus of the weights after an update, which the token may have
        left (log π = -inf, an infinite approx_kl); and the KL the filter alone adds, ``-log`` of the mass it keeps
        (:meth:`sampling_kl_floor`)."""
        tempered = logits / self.temperature  # (B, V)
        keep = top_p_mask(tempered, self.top_p, self.top_k)  # (B, V)
        if record:
            kept = torch.logsumexp(tempered.float().masked_fill(~keep, float("-inf")), -1)  # (B,)
            self._floor.extend((tempered.float().logsumexp(-1) - kept).tolist())  # -log kept mass per row
            for key, bits in zip(_row_keys(obs), np.packbits(keep.cpu().numpy(), axis=-1), strict=True):
                self._sampled[key] = bits  # (ceil(V / 8),) uint8
        return keep

    def sampling_masks(self, obs: PyTorchObs, logits: torch.Tensor) -> torch.Tensor:
        """The nucleus ``(B, V)`` each observation was sampled under in this policy's last rollout; an observation it
        did not sample gets the nucleus of ``logits`` (those of the current weights)."""
        keep = top_p_mask(logits / self.temperature, self.top_p, self.top_k)  # (B, V)
        vocab = keep.shape[-1]
        for row, key in enumerate(_row_keys(obs)):
            bits = self._sampled.get(key)
            if bits is not None:
                keep[row] = torch.from_numpy(np.unpackbits(bits, count=vocab).astype(bool)).to(keep.device)
        return keep

    def sampling_kl_floor(self) -> float | None:
        """The mean over the rollout's steps of ``-log`` the probability mass top-k / top-p kept: the KL (nats per
        token) that filtered sampling alone puts between the policy and its unfiltered reference, a floor under the
        KL penalty's estimate; ``None`` without filtering or before a rollout."""
        return float(np.mean(self._floor)) if self._floor else None

    # --- the SB3 policy interface ----------------------------------------------------------------------------
    def act(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: Any = None, record: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`'s actions ``(B,)``, values ``(B, 1)`` and log-probabilities ``(B,)``, and with top-k / top-p
        the nucleus ``(B, V)`` they were sampled from (``None`` without).

        :param record: keep the nucleus for training (a rollout step of this policy's own algorithm).
        """
        logits, values = self.logits_and_values(obs)
        keep = self._nucleus(obs, logits, record) if self.filters else None
        distribution = self.distribution_from_logits(logits, action_masks, keep)
        actions = distribution.get_actions(deterministic=True) if deterministic else _sample(distribution)
        return actions, values, distribution.log_prob(actions), keep

    def forward(
        self, obs: PyTorchObs, deterministic: bool = False, action_masks: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rolling_out = not self.training and not torch.is_grad_enabled()  # type: ignore[attr-defined]
        return self.act(obs, deterministic, action_masks, record=rolling_out)[:3]

    def evaluate_actions(
        self, obs: PyTorchObs, actions: torch.Tensor, action_masks: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, values = self.logits_and_values(obs)
        if self.filters:  # the nucleus that sampled each action, not the current weights' nucleus
            keep = self.sampling_masks(obs, logits.detach())
            distribution = self.distribution_from_logits(logits, action_masks, keep)
            return values, distribution.log_prob(actions), distribution.entropy()
        if action_masks is None and self.temperature == 1.0:
            # The raw distribution (every algorithm's default): log-probs and entropy from one log_softmax over the
            # vocabulary, where SB3's Categorical runs logsumexp, softmax and a clamp (and their backward passes):
            # half the time on SmolLM2's 49k tokens, the same values within float32 rounding.
            log_p = torch.log_softmax(logits, -1)  # (B, V)
            log_prob = log_p.gather(1, actions.long().reshape(-1, 1)).squeeze(1)  # (B,)
            return values, log_prob, -(log_p.exp() * log_p).sum(-1)
        distribution = self.distribution_from_logits(logits, action_masks)
        return values, distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs, action_masks: Any = None) -> Distribution:
        logits = self.logits_and_values(obs)[0]
        # in training mode the observations are a rollout's (TRPO's objective and KL): under the nucleus that sampled
        keep = self.sampling_masks(obs, logits.detach()) if self.filters and self.training else None  # type: ignore[attr-defined]
        return self.distribution_from_logits(logits, action_masks, keep)

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        """Values ``(B, 1)``; 0 for an observation with no free slot left.

        Such an observation is terminal by the env's definition (``max_new_tokens`` reached, the reward already
        paid, ``terminated``), so no return follows it: its value is 0 by definition, and answering so costs no
        forward pass (the env never asks SB3 to bootstrap it; a wrapper that marked it truncated would).
        """
        full = obs["attention_mask"][:, -1] > 0  # (B,)
        values = torch.zeros(full.shape[0], 1, device=full.device)
        if not full.all():
            values[~full] = self.logits_and_values({k: v[~full] for k, v in obs.items()})[1]
        return values

    def _predict(self, observation: PyTorchObs, deterministic: bool = False, action_masks: Any = None) -> torch.Tensor:
        return self.get_distribution(observation, action_masks).get_actions(deterministic=deterministic)

    # --- what the KL leash and evaluation need ---------------------------------------------------------------
    @torch.no_grad()
    def reference_logits(self, obs: PyTorchObs, cached: bool = True) -> torch.Tensor:
        """Next-token logits ``(B, V)`` of the frozen starting model (float32).

        :param cached: KV-cached like the actor's, for one rollout step's batch at a time; ``False``: one
            :func:`~agents.cached_lm.grouped_forward` pass, for the steps of whole episodes at once.
        """
        ids, mask = _token_ids(obs)  # (B, L)
        if cached and self._use_cache(self._reference_cache, ids, frozen=True):
            return self._reference_cache(ids, mask)[0]
        with self._reference_context():
            return grouped_forward(self._reference_model(), ids, mask, self._reference_weights())[0]

    @torch.no_grad()
    def reference_log_prob(self, obs: PyTorchObs, actions: torch.Tensor, cached: bool = True) -> torch.Tensor:
        """``log π_ref(a|s)`` of the reference model's *raw* distribution (no temperature or filtering), ``(B,)``.

        :param cached: as in :meth:`reference_logits`; ``False``: one :func:`~agents.cached_lm.grouped_log_probs`
            pass, which reads off the log-probs without materialising ``(B, V)`` logits (what ``KLPenalty`` runs
            over a finished rollout).
        """
        if cached:
            return token_log_probs(self.reference_logits(obs, cached), actions)
        ids, mask = _token_ids(obs)  # (B, L)
        with self._reference_context():
            return grouped_log_probs(self._reference_model(), ids, mask, actions, self._reference_weights())

    def _reference_weights(self) -> dict[str, torch.Tensor] | None:
        """The reference cache's bf16 copies of the frozen (LoRA: unmerged base) weights, for uncached passes too:
        autocast would re-cast every float32 weight at every forward, 44 % of the KL pass on SmolLM2. They go with
        the cache at the next ``set_training_mode`` (a rollout's lifetime)."""
        return self._reference_cache.weight_copies()

    def release_rollout_cache(self) -> None:
        """Free the actor's keys/values and merged weight copies once a rollout's last step is taken, so that the KL
        pass's reference copies (0.27 GB on SmolLM2) take their place rather than adding to them; a later call
        fills the cache again, so no result changes."""
        self._actor_cache.reset()

    def set_training_mode(self, mode: bool) -> None:
        switch = mode != self.training  # between rolling out and updating (not every ``predict`` call)
        if switch and not mode:  # a new rollout: the last one's nuclei and floors are done with
            self._sampled.clear()
            self._floor.clear()
        super().set_training_mode(mode)  # type: ignore[misc]
        # Weights change between rollouts: the actor's keys/values and weight copies go stale. The reference's are
        # still valid, but freeing them lets the next rollout's batch shape in.
        if switch:
            self.release_caches()
        else:
            self._reset_caches()

    def release_caches(self) -> None:
        """Free the actor's and the reference's keys/values and weight copies, and give their pages back to the OS.

        A phase that ends in the mode the next one runs in calls it itself: an evaluation (before training, or
        ``--eval-every``) is followed by a rollout, with no switch to trim the heap. After a summarize-docstring
        evaluation of 80 prompts the process held 1.83 GB with the caches dropped but untrimmed, 1.06 GB trimmed.
        """
        self._reset_caches()
        release_free_heap()  # after the caches: their pages go back too

    def tokenizer(self) -> Any:
        """The LM's tokenizer (loaded on demand)."""
        return load_tokenizer(self.lm_name, trust_remote_code=self.trust_remote_code)


class CausalLMPolicy(_CausalLMMixin, ActorCriticPolicy):
    """Actor-critic over a causal LM for ``PPO``, ``A2C`` and ``sb3_contrib.TRPO`` (see :class:`_CausalLMMixin`)."""


class MaskableCausalLMPolicy(_CausalLMMixin, MaskableActorCriticPolicy):
    """The same policy for ``sb3_contrib.MaskablePPO``: the env's ``action_masks()`` filter its distribution."""


def export_pretrained(policy: _CausalLMMixin, path: str | os.PathLike[str]) -> Path:
    """Write the policy's fine-tuned LM (LoRA merged) and tokenizer with ``save_pretrained``.

    The result loads with ``AutoModelForCausalLM.from_pretrained(path)`` and ``pipeline("text-generation")``.
    """
    path = Path(path)
    lm = policy.lm
    if policy.lora is not None:
        lm = copy.deepcopy(lm).merge_and_unload()
    lm.save_pretrained(path)
    policy.tokenizer().save_pretrained(path)
    return path
