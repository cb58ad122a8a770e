"""Training a reward model on preference pairs with the Bradley–Terry loss ``-logsigmoid(r_c - r_r - margin)``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from text_env.models import cache_dir, resolve_model
from text_env.prompts import columns_of
from text_env.rewards import Scorer, call_scorer
from text_env.rewards.preferences import PreferencePair
from text_env.rewards.reward_model import RewardHead, RewardModel, RewardModelConfig

__all__ = [
    "CachedHeads",
    "FeatureCache",
    "RewardModelReport",
    "evaluate_members",
    "evaluate_reward_model",
    "fit_head",
    "fit_heads",
    "normalize_output_scale",
    "split_pairs",
    "train_reward_model",
]


_FEATURE_SETTINGS = ("backbone", "layer", "pooling", "max_length")  # what in a config decides a text's features
LARGE_GAP = 0.5  # |gold(chosen) - gold(rejected)| at which a pair counts as clear-cut


@dataclass
class RewardModelReport:
    """Quality of a reward model on the pairs it was evaluated on (in a training report: the **test** split,
    never used for fitting or for choosing anything).

    ``accuracy``: how often it ranks chosen above rejected (the noisy labels). ``gold_accuracy``: the same
    against the noise-free gold preference (pairs with equal gold scores left out); ``gold_accuracy_large_gap``:
    on the ``n_large_gap`` pairs whose gold scores differ by at least :data:`LARGE_GAP` (the clear-cut ones, where
    a reward model must not err). ``spearman``: rank correlation between its score and the gold score over the
    completions. ``validation_accuracy``: the label accuracy on the validation split, which chose the
    hyperparameters (early stopping, weight decay). ``history``: that validation accuracy per epoch (``lora``,
    ``full``) or per weight decay tried (``head``).

    An ensemble's report is that of its ``mean`` aggregation (``out_gain``/``out_bias``: the aggregated score's
    scale); ``members`` holds each member's own report (its weight decay, validation history and test metrics),
    and the ensemble-level ``weight_decay`` and ``history`` are NaN and empty (each member chose its own).
    """

    n_train: int = 0
    n_validation: int = 0
    n_heldout: int = 0
    accuracy: float = float("nan")
    gold_accuracy: float = float("nan")
    gold_accuracy_large_gap: float = float("nan")
    n_large_gap: int = 0
    spearman: float = float("nan")
    validation_accuracy: float = float("nan")
    weight_decay: float = float("nan")
    out_gain: float = 1.0
    out_bias: float = 0.0
    seconds: float = 0.0
    epochs: int = 0
    history: list[float] = field(default_factory=list)
    ensemble: int = 1
    members: list[RewardModelReport] = field(default_factory=list)


def split_pairs(
    pairs: Sequence[PreferencePair], validation: float = 0.1, test: float = 0.2, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """A fixed, disjoint train / validation / test split: a permutation by ``seed``, test first, then validation.

    Validation chooses hyperparameters and the epoch; test is only reported. The same pairs, fractions and seed
    always give the same split, so a report's test pairs can be recovered from its settings.
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ValueError(f"validation and test are fractions with a sum below 1, got {validation} and {test}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_test, n_val = round(test * len(pairs)), max(1, round(validation * len(pairs)))
    pick = [pairs[i] for i in order]
    return pick[n_test + n_val :], pick[n_test : n_test + n_val], pick[:n_test]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (gold scores tie often, e.g. VADER's 0.0 for neutral text)."""
    ordinal = np.empty(len(x))
    ordinal[np.argsort(x, kind="stable")] = np.arange(len(x))
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ordinal) / counts)[group]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when it is undefined (fewer than two points, or one side constant)."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    if len(a) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate_reward_model(
    model: Scorer, pairs: Sequence[PreferencePair], gold: Scorer | None = None, batch_size: int = 32
) -> RewardModelReport:
    """Pairwise accuracy (labels and, with ``gold``, noise-free gold) and Spearman vs gold on ``pairs``."""
    prompts = [p.prompt for p in pairs]
    chosen = model.score(prompts, [p.chosen for p in pairs])
    rejected = model.score(prompts, [p.rejected for p in pairs])
    return _compare(chosen, rejected, _gold_scores(gold, pairs))


def evaluate_members(
    model: RewardModel | CachedHeads, pairs: Sequence[PreferencePair], gold: Scorer | None = None, batch_size: int = 32
) -> tuple[RewardModelReport, list[RewardModelReport]]:
    """:func:`evaluate_reward_model` of an ensemble (as it aggregates now) and of each member, from one backbone
    pass per text: the members' scores are computed once and aggregated here exactly as ``model.score`` would."""
    prompts = [p.prompt for p in pairs]
    chosen = model.member_scores(prompts, [p.chosen for p in pairs], batch_size)  # (K, N)
    rejected = model.member_scores(prompts, [p.rejected for p in pairs], batch_size)  # (K, N)
    golds = _gold_scores(gold, pairs)

    def combined(members: np.ndarray) -> np.ndarray:  # float32 in, as in score(): the same numbers
        with torch.no_grad():
            return model.combine(torch.from_numpy(members).float()).double().numpy()

    members = [_compare(c, r, golds) for c, r in zip(chosen, rejected, strict=True)]
    return _compare(combined(chosen), combined(rejected), golds), members


def _gold_scores(gold: Scorer | None, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray] | None:
    """Gold scores of the chosen and the rejected completions (``None`` without a gold scorer or pairs)."""
    if gold is None or not pairs:
        return None
    prompts, columns = [p.prompt for p in pairs], columns_of([p.example for p in pairs])
    chosen = call_scorer(gold, prompts, [p.chosen for p in pairs], columns, "gold scorer")
    return chosen, call_scorer(gold, prompts, [p.rejected for p in pairs], columns, "gold scorer")


def _compare(
    chosen: np.ndarray, rejected: np.ndarray, golds: tuple[np.ndarray, np.ndarray] | None
) -> RewardModelReport:
    """The report's metrics from a reward model's and the gold's scores of the chosen and rejected completions."""
    report = RewardModelReport(
        n_heldout=len(chosen), accuracy=float(np.mean(chosen > rejected)) if len(chosen) else math.nan
    )
    if golds is not None:
        g_chosen, g_rejected = golds
        decided = g_chosen != g_rejected
        large = np.abs(g_chosen - g_rejected) >= LARGE_GAP
        agree = (chosen > rejected) == (g_chosen > g_rejected)
        report.gold_accuracy = float(np.mean(agree[decided])) if decided.any() else float("nan")
        report.n_large_gap = int(large.sum())
        report.gold_accuracy_large_gap = float(np.mean(agree[large])) if large.any() else float("nan")
        report.spearman = _spearman(np.concatenate([chosen, rejected]), np.concatenate([g_chosen, g_rejected]))
    return report


WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # L2 strengths a head fit tries (on standardised features)


def _bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


class FeatureCache:
    """Frozen-backbone features of each ``(prompt, completion)``, computed once and kept: a loop that refits heads
    on a growing set of pairs (``textgen rlhf``) and scores the same texts again runs the backbone once per text.

    :param model: a head-mode reward model whose :meth:`~RewardModel.features` are cached (its heads are unused).
    """

    def __init__(self, model: RewardModel, batch_size: int = 32) -> None:
        if model.config.mode != "head":
            raise ValueError(f"features can be cached for a frozen backbone (mode='head'), not {model.config.mode!r}")
        self.model, self.batch_size = model.eval(), batch_size
        self.table: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """``(N, H)`` features, the missing ones computed in batches."""
        keys = list(zip(prompts, completions, strict=True))
        missing = list(dict.fromkeys(k for k in keys if k not in self.table))
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            features = self.model.features([p for p, _ in batch], [c for _, c in batch])  # (b, H)
            self.table.update(zip(batch, features.cpu(), strict=True))
        return torch.stack([self.table[k] for k in keys])

    def preload(self, pairs: Sequence[PreferencePair], progress: bool = False) -> Path:
        """Put the features of these pairs' texts in the table from a file in the user's cache
        (``$TEXTGEN_CACHE/features``), computing and writing it first when there is none; return the file.

        Every run of ``textgen rlhf`` on the default task refits on the same 10,000 base pairs, whose 20,000 texts'
        features cost ~5 minutes on 2 cores: other seeds, later runs and a resumed run read them back instead. The
        file is named by a hash of the texts and of what decides their features (the backbone's files, layer,
        pooling, length, bf16, torch version), so a changed model or setting never reads stale ones; it is written
        whole, then renamed.
        """
        keys = [(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
        file = cache_dir() / "features" / f"{self._fingerprint(keys)}.safetensors"
        if file.is_file():
            self.table.update(zip(keys, load_file(file)["features"], strict=True))
            return file
        for start in tqdm(range(0, len(keys), 1024), desc="features", disable=not progress):
            self([p for p, _ in keys[start : start + 1024]], [c for _, c in keys[start : start + 1024]])
        features = torch.stack([self.table[k] for k in keys])
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.stem}.{os.getpid()}.partial")
        save_file({"features": features.contiguous()}, partial)
        os.replace(partial, file)
        return file

    def _fingerprint(self, keys: list[tuple[str, str]]) -> str:
        config = self.model.config
        where = resolve_model(config.backbone)
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(where).glob("*") if f.is_file())
        settings = [getattr(config, k) for k in _FEATURE_SETTINGS]
        decides = [where, files, settings, self.model.bf16, torch.__version__]
        digest = hashlib.sha256(json.dumps(decides).encode())
        for prompt, completion in keys:
            digest.update(f"{len(prompt)}:{prompt}{len(completion)}:{completion}".encode())
        return digest.hexdigest()[:24]

    def matches(self, config: RewardModelConfig) -> bool:
        """Whether a head-mode reward model of ``config`` reads these features (same backbone, layer, pooling...)."""
        mine = self.model.config
        return config.mode == "head" and all(getattr(config, k) == getattr(mine, k) for k in _FEATURE_SETTINGS)


class CachedHeads:
    """A head-mode reward model's heads on a :class:`FeatureCache`: the model's scores (an ensemble aggregated as
    its ``aggregate`` says) without running the backbone again for a text it has seen."""

    def __init__(self, model: RewardModel, features: FeatureCache) -> None:
        if not features.matches(model.config):
            raise ValueError(
                f"the cached features are not this reward model's: {features.model.config} vs {model.config}"
            )
        self.model, self.features = model, features

    @torch.no_grad()
    def member_scores(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Each member's score, ``(K, N)`` float64, as :meth:`RewardModel.member_scores`."""
        return self.model.member_outputs(self.features(prompts, completions)).double().numpy()

    def combine(self, members: torch.Tensor) -> torch.Tensor:
        """Members' scores ``(K, B)`` -> scores ``(B,)``, as :meth:`RewardModel.combine`."""
        return self.model.combine(members)

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """The reward model's scores ``(N,)``, as :meth:`RewardModel.score`."""
        return self.combine(self.model.member_outputs(self.features(prompts, completions))).double().numpy()


def train_reward_model(
    pairs: Sequence[PreferencePair],
    config: RewardModelConfig | None = None,
    gold: Scorer | None = None,
    epochs: int = 30,
    learning_rate: float | None = None,
    batch_size: int = 32,
    weight_decay: float | Sequence[float] | None = None,
    validation: float = 0.1,
    test: float = 0.2,
    patience: int = 5,
    seed: int = 0,
    normalize: bool = True,
    progress: bool = True,
    features: FeatureCache | None = None,
) -> tuple[RewardModel, RewardModelReport]:
    """Fit a reward model on the train split, choose by the validation split, report on the test split.

    ``"head"`` mode computes the frozen backbone's features once and fits the head to convergence (full-batch
    L-BFGS on the Bradley–Terry loss plus ``weight_decay * |w|^2 / 2``) for each weight decay, keeping the one
    with the lowest validation loss: a deterministic, smooth fit, so tiny numerical differences (e.g. bf16 kernels
    of different CPUs) move the result only a little. ``"lora"`` and ``"full"`` first fit the head that way, then
    train the backbone and head with AdamW for up to ``epochs`` and keep the epoch (0: that warm start) with the
    lowest validation loss (early stopping after ``patience``).

    :param validation: fraction of pairs for choosing (weight decay, epoch); see :func:`split_pairs`.
    :param test: fraction of pairs held out for the report only (0: no test report).
    :param weight_decay: ``head``: the L2 strengths tried (default :data:`WEIGHT_DECAYS`); ``lora``/``full``:
        AdamW's weight decay (default 1e-2).
    :param learning_rate: ``lora``/``full`` only: default 1e-4 for ``lora``, 1e-5 for ``full``.
    :param normalize: set the output scale so that the train split's completions (the base policy's samples)
        score mean 0, standard deviation 1 (an ensemble: each member, then the aggregated score, see
        :class:`RewardModel`).
    :param features: ``head`` mode: features cached by an earlier fit on the same backbone (``textgen rlhf``'s
        refits), computed only for texts not seen before; the fit and the report are the same as without.

    **Ensembles** (``config.ensemble = K > 1``, ``head`` mode): the features are computed once; member ``i`` is
    fitted like a single head on a bootstrap resample of the train split (``numpy.random.default_rng((seed, i))``)
    and chooses its **own** weight decay by its validation loss. Per member rather than shared, because the
    aggregation is chosen later, at load time: a decay tuned for the ensemble's mean would favour one aggregation,
    and members tuned as a whole tend to agree more, muting the disagreement that ``min`` and ``mean_minus_var``
    act on. Per member, each is a reward model in its own right and ``K = 1`` is the single head, unchanged.
    """
    config = config or RewardModelConfig()
    if features is not None and not features.matches(config):
        raise ValueError(f"features are cached for {features.model.config}, which {config} cannot read")
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 preference pairs to train and hold out, got {len(pairs)}")
    started = time.time()
    torch.manual_seed(seed)
    train_pairs, val_pairs, test_pairs = split_pairs(pairs, validation, test, seed)
    model = RewardModel(config)
    if config.mode == "head":
        decays = WEIGHT_DECAYS if weight_decay is None else weight_decay
        decays = [decays] if isinstance(decays, (int, float)) else list(decays)
        histories, member_decays, train_scores = _fit_heads(
            model, train_pairs, val_pairs, decays, batch_size, seed, progress, features
        )
        history, chosen_decay = (histories[0], member_decays[0]) if config.ensemble == 1 else ([], math.nan)
    else:
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError(f"{config.mode} mode takes one weight_decay (AdamW's), got {weight_decay!r}")
        chosen_decay = 1e-2 if weight_decay is None else float(weight_decay)
        history = _train_backbone(model, train_pairs, val_pairs, config, epochs, learning_rate, batch_size,
                                  chosen_decay, patience, seed, progress)  # fmt: skip
        model.eval()
        prompts, texts = [p.prompt for p in train_pairs] * 2, [p.chosen for p in train_pairs]
        train_scores = model.score(prompts, texts + [p.rejected for p in train_pairs], batch_size=batch_size)[None]
    model.eval()
    if normalize:  # the train split's completions are the base policy's samples on training prompts
        normalize_output_scale(model, train_scores)
    scorer = model if features is None else CachedHeads(model, features)
    if config.ensemble == 1:
        report = evaluate_reward_model(scorer, test_pairs, gold, batch_size)
        report.validation_accuracy = evaluate_reward_model(scorer, val_pairs, batch_size=batch_size).accuracy
        report.out_gain, report.out_bias = float(model.head.out_gain), float(model.head.out_bias)
    else:
        report, members = evaluate_members(scorer, test_pairs, gold, batch_size)  # the mean aggregation's report
        report.members, report.ensemble = members, config.ensemble
        validation, members_validation = evaluate_members(scorer, val_pairs, batch_size=batch_size)
        report.validation_accuracy, report.out_gain = validation.accuracy, float(model.agg_gain)
        report.out_bias = float(model.agg_bias)
        for i, member in enumerate(members):
            member.n_train, member.n_validation = len(train_pairs), len(val_pairs)
            member.weight_decay, member.validation_accuracy = member_decays[i], members_validation[i].accuracy
            member.out_gain, member.out_bias = float(model.heads[i].out_gain), float(model.heads[i].out_bias)
            member.epochs, member.history = len(histories[i]), histories[i]
    report.n_train, report.n_validation, report.weight_decay = len(train_pairs), len(val_pairs), chosen_decay
    report.seconds, report.epochs, report.history = time.time() - started, len(history), history
    return model, report


def normalize_output_scale(model: RewardModel, raw: np.ndarray) -> None:
    """Set each member's output scale from its raw scores ``(K, M)`` of the normalisation samples (mean 0, std 1),
    then, for an ensemble, keep the members' normalised scores as ``calibration`` for the aggregated score's scale."""
    for head, scores in zip(model.heads, raw, strict=True):
        std = float(scores.std()) if len(scores) > 1 and scores.std() > 0 else 1.0
        head.out_gain.fill_(1.0 / std)
        head.out_bias.fill_(-float(scores.mean()) / std)
    if len(model.heads) > 1:
        raw32 = torch.from_numpy(raw).float()  # (K, M): what the heads computed, in the dtype they score in
        gains = torch.stack([head.out_gain for head in model.heads])[:, None]  # (K, 1)
        biases = torch.stack([head.out_bias for head in model.heads])[:, None]  # (K, 1)
        model.calibration = gains * raw32 + biases
        model.set_aggregate(model.aggregate, model.lam)


def _fit_heads(
    model: RewardModel,
    train: Sequence[PreferencePair],
    val: Sequence[PreferencePair],
    decays: Sequence[float],
    batch_size: int,
    seed: int,
    progress: bool,
    cache: FeatureCache | None = None,
) -> tuple[list[list[float]], list[float], np.ndarray]:
    """Features of the frozen backbone once (or from ``cache``), then :func:`fit_heads`."""
    encode = model.features if cache is None else cache
    feats = _features(encode, [*train, *val], batch_size, progress)  # (2N, H): chosen of all pairs, then rejected
    total = len(train) + len(val)
    margins = torch.tensor([p.margin or 0.0 for p in [*train, *val]])
    return fit_heads(model, feats[:total], feats[total:], len(train), margins, decays, seed, progress)


def fit_heads(
    model: RewardModel,
    f_chosen: torch.Tensor,
    f_rejected: torch.Tensor,
    n_train: int,
    margins: torch.Tensor | None = None,
    decays: Sequence[float] = WEIGHT_DECAYS,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[list[float]], list[float], np.ndarray]:
    """:func:`fit_head` for each of ``model``'s heads on features (an ensemble's on bootstrap resamples of the train
    rows, ``numpy.random.default_rng((seed, i))``; the validation rows stay as they are).

    :param f_chosen: ``(N, H)`` features of the chosen completions, the first ``n_train`` rows the train split, the
        rest the validation split; ``f_rejected`` likewise.
    :return: each head's validation accuracy per weight decay, each head's chosen decay, and each head's raw
        scores of the (whole, not resampled) train split's completions, ``(K, 2 * n_train)``: what
        :func:`normalize_output_scale` takes.
    """
    n, total = n_train, len(f_chosen)
    margins = torch.zeros(total) if margins is None else margins
    if len(model.heads) == 1:
        history, decay, scores = fit_head(model.head, f_chosen, f_rejected, n, margins, decays, progress)
        return [history], [decay], scores[None]
    train_texts = torch.cat([f_chosen[:n], f_rejected[:n]])  # (2n, H)
    histories, chosen, scores = [], [], []
    for i, head in enumerate(tqdm(model.heads, desc="ensemble members", disable=not progress)):
        rows = torch.from_numpy(np.random.default_rng((seed, i)).integers(0, n, n))  # bootstrap of the train split
        rows = torch.cat([rows, torch.arange(n, total)])  # the validation rows stay as they are
        history, decay, _ = fit_head(head, f_chosen[rows], f_rejected[rows], n, margins[rows], decays)
        with torch.no_grad():
            scores.append(head.raw(train_texts).double().numpy())
        histories.append(history)
        chosen.append(decay)
    return histories, chosen, np.stack(scores)


def fit_head(
    head: RewardHead,
    f_chosen: torch.Tensor,
    f_rejected: torch.Tensor,
    n_train: int,
    margins: torch.Tensor | None = None,
    decays: Sequence[float] = WEIGHT_DECAYS,
    progress: bool = False,
) -> tuple[list[float], float, np.ndarray]:
    """Fit ``head`` on features to convergence for each weight decay; keep the lowest validation loss.

    :param f_chosen: ``(N, H)`` features of the chosen completions, the first ``n_train`` rows the train split,
        the rest the validation split; ``f_rejected`` likewise.
    :return: validation accuracy per weight decay, the chosen weight decay, and the raw scores of the train
        completions (chosen, then rejected).
    """
    n = n_train
    margins = torch.zeros(len(f_chosen)) if margins is None else margins
    margins = margins.double()
    train_feats = torch.cat([f_chosen[:n], f_rejected[:n]])  # (2n, H): standardise over all train texts
    head.mean.copy_(train_feats.mean(0))
    head.std.copy_(train_feats.std(0).clamp(min=1e-4))
    head.double()
    with torch.no_grad():  # standardised once: the closure below runs hundreds of times (what head.raw computes)
        z_chosen, z_rejected = ((f.float() - head.mean) / head.std for f in (f_chosen, f_rejected))

    def raw(z: torch.Tensor) -> torch.Tensor:
        return head.net(z).squeeze(-1)

    params = [p for p in head.parameters() if p.requires_grad]
    initial = {k: v.clone() for k, v in head.state_dict().items()}
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    history = []
    for decay in tqdm(decays, desc="fitting reward head", disable=not progress):
        head.load_state_dict(initial)
        optimizer = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

        def closure(decay: float = decay, optimizer: torch.optim.LBFGS = optimizer) -> torch.Tensor:
            optimizer.zero_grad()
            diff = raw(z_chosen[:n]) - raw(z_rejected[:n])  # (n,)
            penalty = sum((p**2).sum() for name, p in head.named_parameters() if "weight" in name)
            loss = _bt_loss(diff, torch.zeros_like(diff), margins[:n]) + decay * penalty / 2
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            diff = raw(z_chosen[n:]) - raw(z_rejected[n:])  # (n_val,)
            val_loss = float(_bt_loss(diff, torch.zeros_like(diff), margins[n:]))
            history.append(float((diff > 0).double().mean()))
        if best is None or val_loss < best[0]:
            best = (val_loss, decay, {k: v.clone() for k, v in head.state_dict().items()})
    assert best is not None
    head.load_state_dict(best[2])
    head.float()
    with torch.no_grad():
        return history, best[1], head.raw(train_feats).double().numpy()


def _train_backbone(
    model: RewardModel,
    train: Sequence[PreferencePair],
    val: Sequence[PreferencePair],
    config: RewardModelConfig,
    epochs: int,
    learning_rate: float | None,
    batch_size: int,
    weight_decay: float,
    patience: int,
    seed: int,
    progress: bool,
) -> list[float]:
    """AdamW on adapters (``lora``) or every weight (``full``) plus the head; keep the best validation epoch.

    **Warm start.** The head is first fitted to convergence on the starting backbone's features (exactly the
    frozen features: LoRA's ``B = 0`` adapters and the untouched ``full`` weights leave them as they are), which
    also sets its feature standardisation. That is the head-mode model, epoch 0: training the backbone has to
    beat it on validation to be kept, and it starts from a head that already ranks instead of a random one, whose
    gradients would first scramble the backbone (middle layers carry a few activations hundreds of times larger
    than the rest, which an unstandardised random head follows). Epochs are chosen by the validation split's
    Bradley-Terry loss, as weight decays are in head mode (smoother than accuracy on a few hundred pairs).

    :return: the validation accuracy per epoch, epoch 0 (the warm start) first.
    """
    model.eval()
    _fit_heads(model, train, val, WEIGHT_DECAYS, batch_size, seed, progress)
    margins = torch.tensor([p.margin or 0.0 for p in train])
    val_margins = torch.tensor([p.margin or 0.0 for p in val])

    def validate() -> tuple[float, float]:
        prompts = [p.prompt for p in val]
        diff = torch.from_numpy(
            model.score(prompts, [p.chosen for p in val], batch_size)
            - model.score(prompts, [p.rejected for p in val], batch_size)
        )  # (n_val,)
        return float(_bt_loss(diff, torch.zeros_like(diff), val_margins.double())), float((diff > 0).double().mean())

    params = [p for p in model.parameters() if p.requires_grad]
    lr = learning_rate or {"lora": 1e-4, "full": 1e-5}[config.mode]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, accuracy = validate()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if _trained(k, config)}
    history, stale = [accuracy], 0
    for _epoch in range(epochs):
        model.train()
        for idx in tqdm(torch.randperm(len(train)).split(batch_size), desc="epoch", disable=not progress):
            batch = [train[i] for i in idx]
            scores = model([p.prompt for p in batch] * 2, [p.chosen for p in batch] + [p.rejected for p in batch])
            loss = _bt_loss(scores[: len(batch)], scores[len(batch) :], margins[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        loss, accuracy = validate()
        history.append(accuracy)
        if loss < best:
            best, stale = loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if _trained(k, config)}
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state, strict=False)
    return history


def _trained(key: str, config: RewardModelConfig) -> bool:
    return key.startswith("heads.") or config.mode == "full" or (config.mode == "lora" and "lora_" in key)


@torch.no_grad()
def _features(
    encode: Callable[[Sequence[str], Sequence[str]], torch.Tensor],
    pairs: Sequence[PreferencePair],
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """Frozen-backbone features (``encode``: a model's ``features`` or a :class:`FeatureCache`) of every chosen,
    then every rejected completion: ``(2N, H)``."""
    prompts = [p.prompt for p in pairs] * 2
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="backbone features", disable=not progress):
        chunks.append(encode(prompts[start : start + batch_size], texts[start : start + batch_size]))
    return torch.cat(chunks)
