"""Training a reward model on preference pairs with the Bradley–Terry loss ``-logsigmoid(r_c - r_r - margin)``."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from text_env.rewards import Scorer
from text_env.rewards.preferences import PreferencePair
from text_env.rewards.reward_model import RewardHead, RewardModel, RewardModelConfig

__all__ = ["RewardModelReport", "evaluate_reward_model", "fit_head", "split_pairs", "train_reward_model"]


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
    report = RewardModelReport(n_heldout=len(pairs), accuracy=float(np.mean(chosen > rejected)) if pairs else math.nan)
    if gold is not None and pairs:
        g_chosen = gold.score(prompts, [p.chosen for p in pairs])
        g_rejected = gold.score(prompts, [p.rejected for p in pairs])
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
) -> tuple[RewardModel, RewardModelReport]:
    """Fit a reward model on the train split, choose by the validation split, report on the test split.

    ``"head"`` mode computes the frozen backbone's features once and fits the head to convergence (full-batch
    L-BFGS on the Bradley–Terry loss plus ``weight_decay * |w|^2 / 2``) for each weight decay, keeping the one
    with the lowest validation loss: a deterministic, smooth fit, so tiny numerical differences (e.g. bf16 kernels
    of different CPUs) move the result only a little. ``"lora"`` and ``"full"`` train the backbone with AdamW for
    up to ``epochs`` and keep the epoch with the best validation accuracy (early stopping after ``patience``).

    :param validation: fraction of pairs for choosing (weight decay, epoch); see :func:`split_pairs`.
    :param test: fraction of pairs held out for the report only (0: no test report).
    :param weight_decay: ``head``: the L2 strengths tried (default :data:`WEIGHT_DECAYS`); ``lora``/``full``:
        AdamW's weight decay (default 1e-2).
    :param learning_rate: ``lora``/``full`` only: default 1e-4 for ``lora``, 1e-5 for ``full``.
    :param normalize: set the output scale so that the train split's completions (the base policy's samples)
        score mean 0, standard deviation 1.
    """
    config = config or RewardModelConfig()
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 preference pairs to train and hold out, got {len(pairs)}")
    started = time.time()
    torch.manual_seed(seed)
    train_pairs, val_pairs, test_pairs = split_pairs(pairs, validation, test, seed)
    model = RewardModel(config)
    if config.mode == "head":
        decays = WEIGHT_DECAYS if weight_decay is None else weight_decay
        decays = [decays] if isinstance(decays, (int, float)) else list(decays)
        history, chosen_decay, train_scores = _fit_head(model, train_pairs, val_pairs, decays, batch_size, progress)
    else:
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise TypeError(f"{config.mode} mode takes one weight_decay (AdamW's), got {weight_decay!r}")
        chosen_decay = 1e-2 if weight_decay is None else float(weight_decay)
        history = _train_backbone(model, train_pairs, val_pairs, config, epochs, learning_rate, batch_size,
                                  chosen_decay, patience, progress)  # fmt: skip
        model.eval()
        prompts, texts = [p.prompt for p in train_pairs] * 2, [p.chosen for p in train_pairs]
        train_scores = model.score(prompts, texts + [p.rejected for p in train_pairs], batch_size=batch_size)
    model.eval()
    if normalize:  # the train split's completions are the base policy's samples on training prompts
        std = float(train_scores.std()) if len(train_scores) > 1 and train_scores.std() > 0 else 1.0
        model.head.out_gain.fill_(1.0 / std)
        model.head.out_bias.fill_(-float(train_scores.mean()) / std)
    report = evaluate_reward_model(model, test_pairs, gold, batch_size)
    report.validation_accuracy = evaluate_reward_model(model, val_pairs, batch_size=batch_size).accuracy
    report.n_train, report.n_validation, report.weight_decay = len(train_pairs), len(val_pairs), chosen_decay
    report.out_gain, report.out_bias = float(model.head.out_gain), float(model.head.out_bias)
    report.seconds, report.epochs, report.history = time.time() - started, len(history), history
    return model, report


def _fit_head(
    model: RewardModel,
    train: Sequence[PreferencePair],
    val: Sequence[PreferencePair],
    decays: Sequence[float],
    batch_size: int,
    progress: bool,
) -> tuple[list[float], float, np.ndarray]:
    """Features of the frozen backbone once, then :func:`fit_head`."""
    feats = _features(model, [*train, *val], batch_size, progress)  # (2N, H): chosen of all pairs, then rejected
    total = len(train) + len(val)
    margins = torch.tensor([p.margin or 0.0 for p in [*train, *val]])
    return fit_head(model.head, feats[:total], feats[total:], len(train), margins, decays, progress)


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
            diff = head.raw(f_chosen[:n].double()) - head.raw(f_rejected[:n].double())  # (n,)
            penalty = sum((p**2).sum() for name, p in head.named_parameters() if "weight" in name)
            loss = _bt_loss(diff, torch.zeros_like(diff), margins[:n]) + decay * penalty / 2
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            diff = head.raw(f_chosen[n:].double()) - head.raw(f_rejected[n:].double())  # (n_val,)
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
    progress: bool,
) -> list[float]:
    """AdamW on adapters (``lora``) or every weight (``full``) plus the head; keep the best validation epoch."""
    margins = torch.tensor([p.margin or 0.0 for p in train])
    params = [p for p in model.parameters() if p.requires_grad]
    lr = learning_rate or {"lora": 1e-4, "full": 1e-5}[config.mode]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_state, history, stale = -1.0, None, [], 0
    for _epoch in range(epochs):
        model.train()
        for idx in tqdm(torch.randperm(len(train)).split(batch_size), desc="epoch", disable=not progress):
            batch = [train[i] for i in idx]
            scores = model([p.prompt for p in batch] * 2, [p.chosen for p in batch] + [p.rejected for p in batch])
            loss = _bt_loss(scores[: len(batch)], scores[len(batch) :], margins[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy = evaluate_reward_model(model, val, batch_size=batch_size).accuracy
        history.append(accuracy)
        if accuracy > best:
            best, stale = accuracy, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if _trained(k, config)}
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return history


def _trained(key: str, config: RewardModelConfig) -> bool:
    return key.startswith("head.") or config.mode == "full" or (config.mode == "lora" and "lora_" in key)


@torch.no_grad()
def _features(model: RewardModel, pairs: Sequence[PreferencePair], batch_size: int, progress: bool) -> torch.Tensor:
    """Frozen-backbone features of every chosen, then every rejected completion: ``(2N, H)``."""
    prompts = [p.prompt for p in pairs] * 2
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="backbone features", disable=not progress):
        chunks.append(model.features(prompts[start : start + batch_size], texts[start : start + batch_size]))
    return torch.cat(chunks)
