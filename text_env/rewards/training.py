"""Training a reward model on preference pairs with the Bradley–Terry loss ``-logsigmoid(r_c - r_r - margin)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from text_env.rewards import Scorer
from text_env.rewards.preferences import PreferencePair
from text_env.rewards.reward_model import RewardModel, RewardModelConfig

__all__ = ["RewardModelReport", "evaluate_reward_model", "train_reward_model"]


@dataclass
class RewardModelReport:
    """Held-out quality of a reward model.

    ``accuracy``: how often it ranks chosen above rejected (the noisy labels). ``gold_accuracy``: the same
    against the noise-free gold preference (pairs with equal gold scores left out). ``spearman``: rank
    correlation between its score and the gold score over the held-out completions.
    """

    n_train: int = 0
    n_heldout: int = 0
    accuracy: float = float("nan")
    gold_accuracy: float = float("nan")
    spearman: float = float("nan")
    seconds: float = 0.0
    epochs: int = 0
    history: list[float] = field(default_factory=list)  # held-out accuracy per epoch


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
    report = RewardModelReport(n_heldout=len(pairs), accuracy=float(np.mean(chosen > rejected)))
    if gold is not None:
        g_chosen = gold.score(prompts, [p.chosen for p in pairs])
        g_rejected = gold.score(prompts, [p.rejected for p in pairs])
        decided = g_chosen != g_rejected
        agree = (chosen > rejected) == (g_chosen > g_rejected)
        report.gold_accuracy = float(np.mean(agree[decided])) if decided.any() else float("nan")
        report.spearman = _spearman(np.concatenate([chosen, rejected]), np.concatenate([g_chosen, g_rejected]))
    return report


def _bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def train_reward_model(
    pairs: Sequence[PreferencePair],
    config: RewardModelConfig | None = None,
    gold: Scorer | None = None,
    epochs: int = 30,
    learning_rate: float | None = None,
    batch_size: int = 32,
    weight_decay: float = 1e-2,
    heldout: float = 0.1,
    patience: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[RewardModel, RewardModelReport]:
    """Fit a reward model; keep the epoch with the best held-out accuracy (early stopping after ``patience``).

    In ``"head"`` mode the frozen backbone's features are computed once and the head trains on them (seconds
    per epoch); ``"lora"`` and ``"full"`` run the backbone every step (minutes per epoch on a CPU).

    :param heldout: fraction of pairs held out for early stopping and the report.
    :param learning_rate: default 1e-3 for ``head``, 1e-4 for ``lora``, 1e-5 for ``full``.
    """
    config = config or RewardModelConfig()
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 preference pairs to train and hold out, got {len(pairs)}")
    started = time.time()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(len(pairs))
    n_held = max(1, round(heldout * len(pairs)))
    train_pairs = [pairs[i] for i in order[n_held:]]
    held_pairs = [pairs[i] for i in order[:n_held]]
    model = RewardModel(config)
    lr = learning_rate or {"head": 1e-3, "lora": 1e-4, "full": 1e-5}[config.mode]
    margins = torch.tensor([p.margin or 0.0 for p in train_pairs])

    if config.mode == "head":
        feats = _features(model, train_pairs + held_pairs, batch_size, progress)  # (2N, H) chosen then rejected
        n = len(train_pairs)
        f_chosen, f_rejected = feats[: len(feats) // 2], feats[len(feats) // 2 :]
        train_feats = torch.cat([f_chosen[:n], f_rejected[:n]])  # (2n, H): standardise over all train texts
        model.head.mean.copy_(train_feats.mean(0))
        model.head.std.copy_(train_feats.std(0).clamp(min=1e-4))

        def run_epoch() -> None:
            for idx in torch.randperm(n).split(batch_size):
                loss = _bt_loss(model.head(f_chosen[idx]), model.head(f_rejected[idx]), margins[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        def held_accuracy() -> float:
            with torch.no_grad():
                return float((model.head(f_chosen[n:]) > model.head(f_rejected[n:])).float().mean())
    else:

        def run_epoch() -> None:
            model.train()
            for idx in tqdm(torch.randperm(len(train_pairs)).split(batch_size), desc="epoch", disable=not progress):
                batch = [train_pairs[i] for i in idx]
                prompts = [p.prompt for p in batch]
                scores = model(prompts * 2, [p.chosen for p in batch] + [p.rejected for p in batch])
                loss = _bt_loss(scores[: len(batch)], scores[len(batch) :], margins[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        def held_accuracy() -> float:
            return evaluate_reward_model(model, held_pairs, batch_size=batch_size).accuracy

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_state, history, stale = -1.0, None, [], 0
    for _epoch in tqdm(range(epochs), desc="training reward model", disable=not progress or config.mode != "head"):
        run_epoch()
        accuracy = held_accuracy()
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
    model.eval()
    report = evaluate_reward_model(model, held_pairs, gold, batch_size)
    report.n_train, report.seconds, report.epochs, report.history = (
        len(train_pairs), time.time() - started, len(history), history,
    )  # fmt: skip
    return model, report


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
