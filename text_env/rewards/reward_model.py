"""Learned reward models: a causal-LM backbone with a scalar head, trained on preference pairs.

``score(prompt, completion) = head(pool(hidden states of the backbone over prompt + completion))`` — the shape of
``AutoModelForSequenceClassification(num_labels=1)``. A saved reward model is a directory of JSON and
safetensors (no pickle): ``reward_model.json``, ``head.safetensors`` and, when the backbone was trained, its
weights (``backbone/``) or LoRA adapter (``adapter/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from text_env.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    bucketed_matmul_rows,
    load_causal_lm,
    load_frozen_causal_lm,
    load_tokenizer,
)

__all__ = ["RewardHead", "RewardModel", "RewardModelConfig"]

MODES = ("head", "lora", "full")


class _StopForward(Exception):
    """Raised by a forward hook to end the backbone's pass at the block whose output is the feature."""


POOLINGS = ("mean", "last")


@dataclass
class RewardModelConfig:
    """What a reward model is made of.

    :param backbone: model name, directory or hub id of the causal LM whose hidden states are scored.
    :param mode: what training updates: ``"head"`` (frozen backbone: fast, features computed once),
        ``"lora"`` (adapters + head) or ``"full"``.
    :param pooling: ``"mean"`` of the completion's hidden states, or the ``"last"`` token's.
    :param head_hidden: width of the head's hidden layer (0: a linear head).
    :param max_length: prompt + completion tokens kept (the completion's end is kept; the prompt is cut from the left).
    :param layer: score the hidden states after this many transformer blocks (``None``: the last block's, after
        the final norm). Middle layers often carry more of what a task's judge looks at than the last, which is
        shaped for next-token prediction; the backbone then stops at that block, so scoring is faster too.
    """

    backbone: str = DEFAULT_MODEL
    mode: str = "head"
    pooling: str = "mean"
    head_hidden: int = 0
    max_length: int = 128
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 1):
            raise ValueError(f"layer must be None (the last) or a block count >= 1, not {self.layer!r}")


class RewardHead(nn.Module):
    """Standardise features, then a linear layer or a one-hidden-layer MLP to a scalar, then an affine output
    scale (``out_gain * x + out_bias``).

    The output scale is what Ziegler et al. (2019) call normalising the reward model: ``train-rm`` sets it so that
    the base policy's samples score mean 0 and standard deviation 1, so that a KL coefficient β means the same for
    every reward model and task. It does not change the ranking.
    """

    def __init__(self, dim: int, hidden: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("out_gain", torch.ones(()))
        self.register_buffer("out_bias", torch.zeros(()))
        if hidden == 0:
            self.net: nn.Module = nn.Linear(dim, 1)
        else:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """Scores before the output scale, ``(B,)`` (what training fits)."""
        return self.net((features.float() - self.mean) / self.std).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """:param features: ``(B, H)``. :return: ``(B,)`` scores."""
        return self.out_gain * self.raw(features) + self.out_bias


class RewardModel(nn.Module):
    """A reward model: ``score(prompts, completions) -> np.ndarray`` (batched), plus ``save`` / ``load``."""

    def __init__(self, config: RewardModelConfig, backbone: nn.Module | None = None, tokenizer: object | None = None):
        super().__init__()
        self.config = config
        if backbone is None:  # a frozen backbone is shared with whoever else uses that model read-only
            backbone = (
                load_frozen_causal_lm(config.backbone) if config.mode == "head" else load_causal_lm(config.backbone)
            )
        lm = backbone
        if config.mode == "lora" and not hasattr(lm, "peft_config"):
            from peft import LoraConfig, get_peft_model

            lm = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        self.backbone = lm
        self.backbone.requires_grad_(config.mode != "head")
        if config.mode == "lora":
            for name, param in self.backbone.named_parameters():
                param.requires_grad_("lora_" in name)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.backbone)
        self.head = RewardHead(int(lm.config.get_text_config().hidden_size), config.head_hidden)
        self.bf16 = True
        if config.layer is not None and config.layer > len(self._blocks()):
            raise ValueError(
                f"layer={config.layer}, but the backbone {config.backbone!r} has {len(self._blocks())} blocks: "
                f"choose 1..{len(self._blocks())} or None (the last)"
            )

    # --- features --------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Right-padded ids ``(B, T)``, attention mask and completion mask (what ``mean`` pooling averages)."""
        tok = self.tokenizer
        p_ids = tok(list(prompts), add_special_tokens=True)["input_ids"]
        c_ids = tok(list(completions), add_special_tokens=False)["input_ids"]
        rows = []
        for p, c in zip(p_ids, c_ids, strict=True):
            c = c[-self.config.max_length :]
            p = p[max(0, len(p) - (self.config.max_length - len(c))) :] if len(c) < self.config.max_length else []
            rows.append((p + c, [0] * len(p) + [1] * len(c)))
        width = max(1, max(len(r[0]) for r in rows))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])  # (B, T)
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])  # (B, T)
        completion = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in rows])  # (B, T)
        return ids, mask, completion

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B, T, H)`` after ``config.layer`` blocks (the last, normalised, when ``None``).

        For a given layer the forward pass stops right after that block (a hook raises out of it), so blocks
        above it cost nothing; the shared frozen backbone itself is never modified.
        """
        if self.config.layer is None:
            out = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            return out.hidden_states[-1]
        captured: list[torch.Tensor] = []

        def stop(module: nn.Module, inputs: object, output: object) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]
            raise _StopForward

        handle = self._blocks()[self.config.layer - 1].register_forward_hook(stop)
        try:
            self.backbone(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def _blocks(self) -> nn.ModuleList:
        """The backbone's transformer blocks (the ``...layers`` ModuleList of a decoder, peft-wrapped or not)."""
        for name, module in self.backbone.named_modules():
            if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module):
                return module
        raise ValueError(f"cannot find the transformer blocks of {type(self.backbone).__name__}: use layer=None")

    def features(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Pooled hidden states ``(B, H)`` (differentiable unless the backbone is frozen)."""
        device = next(self.backbone.parameters()).device
        ids, mask, completion = (t.to(device) for t in self.encode(prompts, completions))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16), bucketed_matmul_rows():
            hidden = self.hidden_states(ids, mask)  # (B, T, H): batches of every shape, a few kernel shapes
        return self.pool(hidden, mask, completion)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hidden states -> ``(B, H)`` by ``config.pooling`` (float32)."""
        hidden = hidden.float()
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]  # (B, H)
        if self.config.pooling == "last":
            return last
        weights = completion.float().unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)
        return torch.where(completion.sum(1, keepdim=True) > 0, mean, last)  # empty completion: last prompt token

    def forward(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Scores ``(B,)`` as a tensor (for training)."""
        return self.head(self.features(prompts, completions))

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """Scores of ``(prompt, completion)`` pairs, shape ``(len(prompts),)``, float64."""
        self.eval()
        scores = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress):
            end = start + batch_size
            scores.append(self(prompts[start:end], completions[start:end]).float().cpu().numpy())
        return np.concatenate(scores).astype(np.float64) if scores else np.zeros(0)

    # --- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the directory described in the module docstring; return it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        if self.config.mode == "full":
            self.backbone.save_pretrained(path / "backbone")
            self.tokenizer.save_pretrained(path / "backbone")  # type: ignore[attr-defined]
        elif self.config.mode == "lora":
            self.backbone.save_pretrained(path / "adapter")
        (path / "reward_model.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, path / "head.safetensors")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RewardModel:
        """Load a saved reward model directory (no pickle involved).

        A relative ``backbone`` in ``reward_model.json`` is taken relative to the reward-model directory when it
        names a directory there, so that a reward model and its backbone can move together.

        :raises ModelLoadError: a missing or corrupted file, or a head that does not fit the backbone, naming the
            file and what to do.
        """
        path = Path(path)
        if not (path / "reward_model.json").is_file() or not (path / "head.safetensors").is_file():
            raise ModelLoadError(
                f"{path} is not a reward-model directory: it needs reward_model.json and head.safetensors "
                "(write one with `textgen train-rm` or RewardModel.save)"
            )
        config = _read_config(path / "reward_model.json")
        relative = Path(config.backbone).expanduser()
        if not relative.is_absolute() and (path / relative).is_dir():
            config.backbone = str((path / relative).resolve())
        head = _read_head(path / "head.safetensors")
        backbone, tokenizer = None, None
        if config.mode == "full":
            backbone, tokenizer = load_causal_lm(path / "backbone"), load_tokenizer(path / "backbone")
        elif config.mode == "lora":
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(load_causal_lm(config.backbone), path / "adapter")
        model = cls(config, backbone, tokenizer)
        features, hidden = head["mean"].numel(), model.head.mean.numel()
        if features != hidden:
            raise ModelLoadError(
                f"{path / 'head.safetensors'} scores {features}-dim features, but the backbone {config.backbone!r} "
                f"has hidden size {hidden}: the head was trained on another backbone. Set 'backbone' in "
                f"{path / 'reward_model.json'} to the model it was trained on."
            )
        head.setdefault("out_gain", torch.ones(()))  # heads saved before the output scale existed
        head.setdefault("out_bias", torch.zeros(()))
        try:
            model.head.load_state_dict(head)
        except RuntimeError as err:  # missing, extra or mis-shaped tensors (e.g. head_hidden edited)
            raise ModelLoadError(
                f"{path / 'head.safetensors'} does not fit the head described in {path / 'reward_model.json'} "
                f"(head_hidden={config.head_hidden}): {err}. Re-save the reward model with RewardModel.save."
            ) from err
        return model.eval()


def _read_config(file: Path) -> RewardModelConfig:
    """Parse ``reward_model.json``; anything but a JSON object of :class:`RewardModelConfig` fields raises."""
    redo = "Re-save the reward model with RewardModel.save (or `textgen train-rm`), or fix the file by hand."
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{file} is not valid JSON ({err}). {redo}") from err
    defaults = {f.name: f.default for f in fields(RewardModelConfig)}
    if not isinstance(record, dict):
        raise ModelLoadError(f"{file} must hold a JSON object with keys {sorted(defaults)}. {redo}")
    unknown = sorted(set(record) - set(defaults))
    if unknown:
        raise ModelLoadError(f"{file} has unknown key(s) {unknown}; the allowed keys are {sorted(defaults)}. {redo}")
    for key, value in record.items():
        expected = type(defaults[key]) if defaults[key] is not None else int  # layer: an int or null
        if value is None and defaults[key] is None:
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ModelLoadError(
                f"{file}: {key!r} must be {expected.__name__}, got {value!r} ({type(value).__name__}). {redo}"
            )
    try:
        return RewardModelConfig(**record)
    except ValueError as err:
        raise ModelLoadError(f"{file}: {err}. {redo}") from err


def _read_head(file: Path) -> dict[str, torch.Tensor]:
    """The head's tensors; an unreadable file raises, naming it."""
    try:
        head = load_file(file)
    except SafetensorError as err:
        raise ModelLoadError(
            f"{file} is not a valid safetensors file ({err}); re-save the reward model with RewardModel.save"
        ) from err
    if "mean" not in head:
        raise ModelLoadError(
            f"{file} holds no 'mean' tensor (it has {sorted(head)}): it is not a reward-model head; re-save the "
            "reward model with RewardModel.save"
        )
    return head
