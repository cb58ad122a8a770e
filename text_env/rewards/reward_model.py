"""Learned reward models: a causal-LM backbone with a scalar head, trained on preference pairs.

``score(prompt, completion) = head(pool(hidden states of the backbone over prompt + completion))`` — the shape of
``AutoModelForSequenceClassification(num_labels=1)``. A saved reward model is a directory of JSON and
safetensors (no pickle): ``reward_model.json``, ``head.safetensors`` and, when the backbone was trained, its
weights (``backbone/``) or LoRA adapter (``adapter/``).

An **ensemble** (``RewardModelConfig(ensemble=K)``, Coste et al. 2023) is ``K`` heads on the same frozen features:
the backbone runs once per text, the heads cost a dot product each. Its ``head.safetensors`` holds member ``i``'s
tensors as ``"{i}.mean"``, ``"{i}.net.weight"``, ... plus ``"calibration"``, the members' scores of the samples the
scale was normalised on, from which the aggregated score's scale is set for the aggregation chosen at load time.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from text_env.models import (
    DEFAULT_BF16,
    DEFAULT_MODEL,
    ModelLoadError,
    bucketed_matmul_rows,
    load_causal_lm,
    load_frozen_causal_lm,
    load_tokenizer,
    lora_model,
)

__all__ = [
    "AGGREGATES",
    "DEFAULT_LAMBDA",
    "RewardHead",
    "RewardModel",
    "RewardModelConfig",
    "aggregate_scores",
    "check_aggregate",
]

MODES = ("head", "lora", "full")
AGGREGATES = ("mean", "min", "mean_minus_var")
"""How an ensemble's member scores become one score: their ``mean``, the worst case (``min``), or the mean less
``lam`` times their variance (``mean_minus_var``: Coste et al.'s uncertainty-weighted optimisation)."""
DEFAULT_LAMBDA = 0.5  # weight of the members' variance in "mean_minus_var" (in units of a member's normalised scale)


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
        shaped for next-token prediction; the backbone then stops at that block, so scoring is faster too. A list
        (e.g. ``[1, 20]``) concatenates those blocks' pooled states: an early, lexical block beside a middle one
        ranked sentiment better than either alone (``benchmarks/results/reward_model_data.md``), in the same pass.
    :param ensemble: number of heads (``head`` mode only): ``K > 1`` heads on the same frozen features, combined by
        the aggregation chosen at load time (:data:`AGGREGATES`). A reward model of one head saves as it always did.
    """

    backbone: str = DEFAULT_MODEL
    mode: str = "head"
    pooling: str = "mean"
    head_hidden: int = 0
    max_length: int = 128
    layer: int | list[int] | None = None
    ensemble: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if isinstance(self.layer, tuple):
            self.layer = list(self.layer)
        layers = self.layers
        if layers is not None and (
            not layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layers)
            or len(set(layers)) != len(layers)
        ):  # fmt: skip
            raise ValueError(
                f"layer must be None (the last), a block count >= 1 or a list of distinct ones, not {self.layer!r}"
            )
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"ensemble must be a number of heads >= 1, not {self.ensemble!r}")
        if self.ensemble > 1 and self.mode != "head":
            raise ValueError(
                f"ensemble={self.ensemble} needs mode='head' (K heads on one frozen backbone), not {self.mode!r}: "
                "an ensemble of trained backbones would cost K backbones"
            )

    @property
    def layers(self) -> list[int] | None:
        """The blocks whose pooled states are concatenated, in order (``None``: the last, normalised state)."""
        if self.layer is None:
            return None
        return list(self.layer) if isinstance(self.layer, list) else [self.layer]


def check_aggregate(aggregate: str, lam: float) -> None:
    """Raise ``ValueError`` naming what is allowed, for an unknown aggregation or a negative or non-finite ``lam``."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, not {aggregate!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (the variance weight of 'mean_minus_var') must be a finite number >= 0, not {lam!r}")


def aggregate_scores(members: torch.Tensor, aggregate: str = "mean", lam: float = DEFAULT_LAMBDA) -> torch.Tensor:
    """Combine ensemble members' scores into one score per text.

    :param members: ``(K, B)`` scores, one row per member.
    :param aggregate: ``"mean"``; ``"min"`` (worst case over members); ``"mean_minus_var"``: ``mean - lam * var``,
        ``var`` the population variance over the members (divided by ``K``), so disagreement costs reward.
    :param lam: the variance weight of ``"mean_minus_var"`` (ignored otherwise), ``>= 0``.
    :return: ``(B,)`` scores; for ``K = 1`` every aggregation is the member's score itself.
    """
    check_aggregate(aggregate, lam)
    if aggregate == "min":
        return members.min(0).values
    if aggregate == "mean_minus_var":
        return members.mean(0) - lam * members.var(0, unbiased=False)
    return members.mean(0)


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
    """A reward model: ``score(prompts, completions) -> np.ndarray`` (batched), plus ``save`` / ``load``.

    An ensemble (``config.ensemble = K > 1``) scores a text by :func:`aggregate_scores` over its members' scores
    (``aggregate``, ``lam``: chosen when it is made or loaded, changed with :meth:`set_aggregate`);
    :meth:`member_scores` gives the members' own scores for diagnostics.

    **Scale.** Each member's output scale (``out_gain``, ``out_bias``) makes it score mean 0, std 1 on the base
    policy's samples, so that members are comparable (``min`` and the variance compare like with like, and ``lam``
    is in units of a member's spread). The *aggregated* score then gets its own affine scale, recomputed from the
    stored ``calibration`` scores for whichever aggregation is chosen, so that it too scores mean 0, std 1 on those
    samples: β of the KL penalty means the same for one head, an ensemble and any aggregation (averaging alone
    would shrink the spread and ``min`` would shift the mean, quietly changing what β means).
    """

    def __init__(
        self,
        config: RewardModelConfig,
        backbone: nn.Module | None = None,
        tokenizer: object | None = None,
        aggregate: str = "mean",
        lam: float = DEFAULT_LAMBDA,
    ) -> None:
        super().__init__()
        check_aggregate(aggregate, lam)
        self.config = config
        if backbone is None:  # a frozen backbone is shared with whoever else uses that model read-only
            backbone = (
                load_frozen_causal_lm(config.backbone) if config.mode == "head" else load_causal_lm(config.backbone)
            )
        lm = backbone
        if config.mode == "lora" and not hasattr(lm, "peft_config"):
            lm = lora_model(lm, r=16, lora_alpha=32, target_modules="all-linear")
        self.backbone = lm
        self.backbone.requires_grad_(config.mode != "head")
        if config.mode == "lora":
            for name, param in self.backbone.named_parameters():
                param.requires_grad_("lora_" in name)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.backbone)
        hidden = int(lm.config.get_text_config().hidden_size) * len(config.layers or [None])
        self.heads = nn.ModuleList([RewardHead(hidden, config.head_hidden) for _ in range(config.ensemble)])
        # Members' normalised scores (K, M) of the samples the scale was fitted on; (K, 0): none (one head needs none).
        self.register_buffer("calibration", torch.zeros(config.ensemble, 0), persistent=False)
        self.register_buffer("agg_gain", torch.ones(()), persistent=False)  # the aggregated score's scale
        self.register_buffer("agg_bias", torch.zeros(()), persistent=False)
        self.set_aggregate(aggregate, lam)
        self.bf16 = DEFAULT_BF16
        if config.layers is not None and max(config.layers) > len(self._blocks()):
            raise ValueError(
                f"layer={config.layer}, but the backbone {config.backbone!r} has {len(self._blocks())} blocks: "
                f"choose 1..{len(self._blocks())} or None (the last)"
            )

    @property
    def head(self) -> RewardHead:
        """The head of a single-head reward model (member 0 of an ensemble)."""
        return self.heads[0]  # type: ignore[return-value]

    # --- ensembles -------------------------------------------------------------------------------------------
    def set_aggregate(self, aggregate: str = "mean", lam: float = DEFAULT_LAMBDA) -> None:
        """Choose how members combine (:data:`AGGREGATES`) and rescale the aggregated score to mean 0, std 1 on the
        ``calibration`` samples (no calibration, e.g. one head or an unnormalised ensemble: no rescaling)."""
        check_aggregate(aggregate, lam)
        self.aggregate, self.lam = aggregate, float(lam)
        gain, bias = 1.0, 0.0
        if len(self.heads) > 1 and self.calibration.shape[1] > 1:
            combined = aggregate_scores(self.calibration.double(), aggregate, lam)  # (M,)
            std = float(combined.std(unbiased=False))
            gain = 1.0 / std if std > 0 else 1.0
            bias = -float(combined.mean()) * gain
        self.agg_gain.fill_(gain)
        self.agg_bias.fill_(bias)

    def combine(self, members: torch.Tensor) -> torch.Tensor:
        """Members' scores ``(K, B)`` -> the reward model's scores ``(B,)``: aggregated, then rescaled."""
        return self.agg_gain * aggregate_scores(members, self.aggregate, self.lam) + self.agg_bias

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

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states ``(B, T, H)`` after each of ``config.layers`` blocks (one: the last, normalised, when
        ``layer`` is ``None``).

        The forward pass stops right after the deepest block asked for (a hook raises out of it), so blocks above
        it cost nothing; the shared frozen backbone itself is never modified.
        """
        if self.config.layers is None:
            out = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            return [out.hidden_states[-1]]
        blocks, deepest = self._blocks(), max(self.config.layers)
        captured: dict[int, torch.Tensor] = {}

        def keep(k: int) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: object, output: object) -> None:
                captured[k] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]
                if k == deepest:
                    raise _StopForward

            return hook

        handles = [blocks[k - 1].register_forward_hook(keep(k)) for k in self.config.layers]
        try:
            self.backbone(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[k] for k in self.config.layers]

    def _blocks(self) -> nn.ModuleList:
        """The backbone's transformer blocks (the ``...layers`` ModuleList of a decoder, peft-wrapped or not)."""
        for name, module in self.backbone.named_modules():
            if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module):
                return module
        raise ValueError(f"cannot find the transformer blocks of {type(self.backbone).__name__}: use layer=None")

    def features(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Pooled hidden states ``(B, H)``, each listed layer's side by side (differentiable unless the backbone is
        frozen)."""
        device = next(self.backbone.parameters()).device
        ids, mask, completion = (t.to(device) for t in self.encode(prompts, completions))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16), bucketed_matmul_rows():
            hidden = self.hidden_states(ids, mask)  # [(B, T, H)]: batches of every shape, a few kernel shapes
        return torch.cat([self.pool(h, mask, completion) for h in hidden], dim=-1)  # (B, H * layers)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hidden states -> ``(B, H)`` by ``config.pooling`` (float32)."""
        hidden = hidden.float()
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]  # (B, H)
        if self.config.pooling == "last":
            return last
        weights = completion.float().unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)
        return torch.where(completion.sum(1, keepdim=True) > 0, mean, last)  # empty completion: last prompt token

    def member_outputs(self, features: torch.Tensor) -> torch.Tensor:
        """Each member's (normalised) score of pooled features ``(B, H)``: ``(K, B)``."""
        return torch.stack([head(features) for head in self.heads])

    def forward(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Scores ``(B,)`` as a tensor (for training)."""
        features = self.features(prompts, completions)  # (B, H): the backbone runs once for every member
        if len(self.heads) == 1:
            return self.head(features)
        return self.combine(self.member_outputs(features))

    @torch.no_grad()
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """Scores of ``(prompt, completion)`` pairs, shape ``(len(prompts),)``, float64."""
        return self._batched(self, prompts, completions, batch_size, progress, rows=())

    @torch.no_grad()
    def member_scores(
        self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32, progress: bool = False
    ) -> np.ndarray:
        """Each member's normalised score before aggregation, shape ``(K, len(prompts))``, float64 (diagnostics:
        where members disagree; ``combine`` of these is :meth:`score`)."""

        def members(p: Sequence[str], c: Sequence[str]) -> torch.Tensor:
            return self.member_outputs(self.features(p, c))

        return self._batched(members, prompts, completions, batch_size, progress, rows=(len(self.heads),))

    def _batched(
        self, fn: Callable[..., torch.Tensor], prompts: Sequence[str], completions: Sequence[str], batch_size: int,
        progress: bool, rows: tuple[int, ...],
    ) -> np.ndarray:  # fmt: skip
        """``fn`` over batches of texts, concatenated along the last axis (float64); ``rows``: ``fn``'s leading
        dimensions (the shape of the result when there are no texts is ``(*rows, 0)``)."""
        self.eval()
        scores = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="scoring", disable=not progress):
            end = start + batch_size
            scores.append(fn(prompts[start:end], completions[start:end]).float().cpu().numpy())
        return np.concatenate(scores, axis=-1).astype(np.float64) if scores else np.zeros((*rows, 0))

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
        if self.config.ensemble == 1:  # one head: the files of every earlier version, byte for byte
            del config["ensemble"]
            tensors = self.head.state_dict()
        else:
            tensors = {f"{i}.{k}": v for i, head in enumerate(self.heads) for k, v in head.state_dict().items()}
            if self.calibration.shape[1]:
                tensors["calibration"] = self.calibration
        (path / "reward_model.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / "head.safetensors")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], aggregate: str = "mean", lam: float = DEFAULT_LAMBDA) -> RewardModel:
        """Load a saved reward model directory (no pickle involved).

        A relative ``backbone`` in ``reward_model.json`` is taken relative to the reward-model directory when it
        names a directory there, so that a reward model and its backbone can move together.

        :param aggregate: how an ensemble's members combine (:data:`AGGREGATES`; any of them is the head itself for
            a single head).
        :param lam: the variance weight of ``"mean_minus_var"``, ``>= 0``.
        :raises ModelLoadError: a missing or corrupted file, or a head that does not fit the backbone, naming the
            file and what to do.
        :raises ValueError: an unknown ``aggregate`` or a negative ``lam`` (before anything is loaded).
        """
        check_aggregate(aggregate, lam)
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
        members, calibration = _read_heads(path / "head.safetensors", config.ensemble)
        backbone, tokenizer = None, None
        if config.mode == "full":
            backbone, tokenizer = load_causal_lm(path / "backbone"), load_tokenizer(path / "backbone")
        elif config.mode == "lora":
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(load_causal_lm(config.backbone), path / "adapter")
        model = cls(config, backbone, tokenizer)
        features, hidden = members[0]["mean"].numel(), model.head.mean.numel()
        if features != hidden:
            raise ModelLoadError(
                f"{path / 'head.safetensors'} scores {features}-dim features, but the backbone {config.backbone!r} "
                f"has hidden size {hidden}: the head was trained on another backbone. Set 'backbone' in "
                f"{path / 'reward_model.json'} to the model it was trained on."
            )
        for head, tensors in zip(model.heads, members, strict=True):
            tensors.setdefault("out_gain", torch.ones(()))  # heads saved before the output scale existed
            tensors.setdefault("out_bias", torch.zeros(()))
            try:
                head.load_state_dict(tensors)
            except RuntimeError as err:  # missing, extra or mis-shaped tensors (e.g. head_hidden edited)
                raise ModelLoadError(
                    f"{path / 'head.safetensors'} does not fit the head described in {path / 'reward_model.json'} "
                    f"(head_hidden={config.head_hidden}): {err}. Re-save the reward model with RewardModel.save."
                ) from err
        if calibration is not None:
            model.calibration = calibration.float()
        model.set_aggregate(aggregate, lam)
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
        # layer: an int, a list of ints (checked by RewardModelConfig) or null
        expected = (type(defaults[key]),) if defaults[key] is not None else (int, list)
        if value is None and defaults[key] is None:
            continue
        if not isinstance(value, expected) or isinstance(value, bool):
            allowed = " or ".join(t.__name__ for t in expected)
            raise ModelLoadError(f"{file}: {key!r} must be {allowed}, got {value!r} ({type(value).__name__}). {redo}")
    try:
        return RewardModelConfig(**record)
    except ValueError as err:
        raise ModelLoadError(f"{file}: {err}. {redo}") from err


def _read_heads(file: Path, ensemble: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
    """Each member's tensors and the calibration scores (``None`` if absent); an unreadable file, or one whose
    members do not match ``ensemble``, raises, naming it."""
    redo = "re-save the reward model with RewardModel.save"
    try:
        tensors = load_file(file)
    except SafetensorError as err:
        raise ModelLoadError(f"{file} is not a valid safetensors file ({err}); {redo}") from err
    if ensemble == 1:
        if "mean" not in tensors:
            raise ModelLoadError(
                f"{file} holds no 'mean' tensor (it has {sorted(tensors)}): it is not a reward-model head; {redo}"
            )
        return [tensors], None
    calibration = tensors.pop("calibration", None)
    members: list[dict[str, torch.Tensor]] = [{} for _ in range(ensemble)]
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) >= ensemble:
            raise ModelLoadError(
                f"{file} holds {key!r}, but reward_model.json says ensemble={ensemble} (keys '0.mean' .. "
                f"'{ensemble - 1}.net.bias'); {redo}"
            )
        members[int(index)][name] = value
    missing = [i for i, member in enumerate(members) if "mean" not in member]
    if missing:
        raise ModelLoadError(f"{file} lacks member(s) {missing} of the ensemble of {ensemble} heads; {redo}")
    if calibration is not None and (calibration.ndim != 2 or calibration.shape[0] != ensemble):
        raise ModelLoadError(
            f"{file}: 'calibration' has shape {tuple(calibration.shape)}, not ({ensemble}, samples); {redo}"
        )
    return members, calibration
