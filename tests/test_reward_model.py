"""Reward models on the tiny backbone: learning a learnable preference, the three training modes, evaluation
metrics, pickle-free save/load, ensembles and their aggregation, and use as the env's reward."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import shipped_reward_models
import torch
from conftest import TINY_PROMPTS
from safetensors.torch import load_file, save_file

import text_env  # registers TextGen-v0
from text_env.core import DEFAULT_TASK
from text_env.models import ModelLoadError, make_tiny_model
from text_env.rewards.preferences import PreferencePair, append_pairs
from text_env.rewards.reward_model import (
    AGGREGATES,
    RewardModel,
    RewardModelConfig,
    _read_config,
    _read_heads,
    aggregate_scores,
)
from text_env.rewards.training import (
    WEIGHT_DECAYS,
    CachedHeads,
    FeatureCache,
    _spearman,
    evaluate_reward_model,
    split_pairs,
    train_reward_model,
)

PROMPTS = [*TINY_PROMPTS, "this review is about", "my friends said", "last week i saw", "the director made"]
FILLER = ["the plot", "it was", "a story", "and the acting", "this film", "overall", "with my family", "so"]
POSITIVE, NEGATIVE = ["good", "great", "wonderful"], ["bad", "awful", "terrible"]


def sentiment_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Chosen has two positive words where rejected has two negative ones; prompt and filler vary."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b, c = rng.sample(FILLER, 3)
        (p1, p2), (n1, n2) = rng.sample(POSITIVE, 2), rng.sample(NEGATIVE, 2)
        pairs.append(PreferencePair(rng.choice(PROMPTS), f"{a} {p1} {b} {p2} {c}", f"{a} {n1} {b} {n2} {c}"))
    return pairs


class WordGold:
    """Gold: +1 per positive word, -1 per negative word (distinct enough to avoid ties in small tests)."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        words = [c.split() for c in completions]
        return np.array([sum(w in POSITIVE for w in ws) - sum(w in NEGATIVE for w in ws) for ws in words], float)


class TableScorer:
    """A fake model or gold scorer with known scores per completion."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([self.table[c] for c in completions], dtype=np.float64)


def config(tiny_model: Path, mode: str = "head", **kwargs: object) -> RewardModelConfig:
    return RewardModelConfig(backbone=str(tiny_model), mode=mode, **kwargs)  # type: ignore[arg-type]


# --- learning -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_model(tiny_model: Path) -> tuple[RewardModel, object]:
    """A head-mode reward model trained on the sentiment pairs (trained once for the module)."""
    return train_reward_model(sentiment_pairs(200, seed=0), config(tiny_model, pooling="mean"), gold=WordGold(),
                              progress=False)  # fmt: skip


def test_head_mode_learns_a_learnable_preference(head_model: tuple) -> None:
    model, report = head_model
    assert (report.n_train, report.n_validation, report.n_heldout) == (140, 20, 40)
    assert report.accuracy >= 0.9 and report.gold_accuracy >= 0.9 and report.spearman > 0.5
    assert report.gold_accuracy_large_gap >= 0.9 and report.n_large_gap == 40  # every pair differs by 4 words
    assert report.epochs == len(report.history) == len(WEIGHT_DECAYS) and report.weight_decay in WEIGHT_DECAYS
    # pairs never seen in training or early stopping
    fresh = evaluate_reward_model(model, sentiment_pairs(60, seed=1), gold=WordGold())
    assert fresh.accuracy >= 0.9, fresh
    assert fresh.gold_accuracy == fresh.accuracy  # noise-free labels: the two agree
    # the learned score also ranks single texts: more positive words score higher
    scores = model.score(["the movie was"] * 3, ["it was terrible so awful", "it was so", "it was wonderful so great"])
    assert scores[0] < scores[2]


@pytest.fixture(scope="module")
def trained(tiny_model: Path, head_model: tuple) -> dict[str, tuple[RewardModel, object]]:
    """One model per mode. LoRA and full train two epochs on a handful of pairs, with a large learning rate so that
    the adapter / backbone move far from their initial values (a save/load bug would then change the scores)."""
    pairs, models = sentiment_pairs(10, seed=2), {"head": head_model}
    for mode in ("lora", "full"):
        models[mode] = train_reward_model(
            pairs, config(tiny_model, mode, pooling="last"), gold=WordGold(), epochs=2, learning_rate=1e-2,
            batch_size=4, validation=0.2, test=0.2, progress=False,
        )  # fmt: skip
    return models


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_lora_and_full_modes_train(trained: dict, tiny_model: Path, mode: str) -> None:
    model, report = trained[mode]
    assert (report.n_train, report.n_validation, report.n_heldout) == (6, 2, 2)
    assert report.epochs == len(report.history) == 3  # epoch 0 (the warm-started head), then two of training
    for value in (report.accuracy, report.gold_accuracy, report.spearman, report.seconds, *report.history):
        assert math.isfinite(value)
    assert 0.0 <= report.accuracy <= 1.0 and 0.0 <= report.gold_accuracy <= 1.0 and -1.0 <= report.spearman <= 1.0
    if mode == "lora":
        assert all(p.requires_grad == ("lora_" in n) for n, p in model.backbone.named_parameters())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_backbone_training_starts_from_the_fitted_head(tiny_model: Path, mode: str) -> None:
    """Epoch 0 of lora/full is the head-mode model: the head fitted on the starting (= frozen) features, so
    training the backbone starts from a head that ranks and is kept only if it beats it on validation."""
    pairs = sentiment_pairs(10, seed=2)
    kwargs = {"gold": WordGold(), "batch_size": 4, "validation": 0.2, "test": 0.2, "progress": False}
    head, _ = train_reward_model(pairs, config(tiny_model, "head", pooling="last"), **kwargs)
    warm, report = train_reward_model(pairs, config(tiny_model, mode, pooling="last"), epochs=0, **kwargs)
    assert report.epochs == 1
    prompts, completions = ["the movie was", "a sad , dull"], ["it was wonderful", "so awful and bad"]
    np.testing.assert_allclose(warm.score(prompts, completions), head.score(prompts, completions), atol=1e-4)


def test_train_needs_four_pairs(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="at least 4 preference pairs"):
        train_reward_model(sentiment_pairs(3, 0), config(tiny_model), progress=False)


def test_split_is_fixed_and_disjoint() -> None:
    pairs = sentiment_pairs(50, seed=3)
    train, val, test = split_pairs(pairs, validation=0.1, test=0.2, seed=7)
    assert (len(train), len(val), len(test)) == (35, 5, 10)
    ids = [{id(p) for p in part} for part in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and len(set.union(*ids)) == 50
    assert split_pairs(pairs, 0.1, 0.2, seed=7) == (train, val, test)  # the same settings, the same split
    with pytest.raises(ValueError, match="sum below 1"):
        split_pairs(pairs, validation=0.5, test=0.5)


def test_normalised_scale_on_the_samples_it_was_fitted_on(head_model: tuple) -> None:
    """The output scale makes the train split's completions score mean 0 and std 1, without changing the order."""
    model = head_model[0]
    train, _, _ = split_pairs(sentiment_pairs(200, seed=0), 0.1, 0.2, seed=0)
    prompts, texts = [p.prompt for p in train] * 2, [p.chosen for p in train] + [p.rejected for p in train]
    scores = model.score(prompts, texts)
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1.0) < 1e-4
    with torch.no_grad():
        raw = model.head.raw(model.features(prompts[:8], texts[:8])).double().numpy()
    assert np.array_equal(np.argsort(raw), np.argsort(scores[:8])) and float(model.head.out_gain) > 0


@pytest.mark.parametrize("layer", [1, 2])
def test_layer_features_stop_the_backbone_at_that_block(tiny_model: Path, layer: int) -> None:
    model = RewardModel(config(tiny_model, layer=layer))
    ids, mask, _ = model.encode(["the movie was"], ["good"])
    with torch.no_grad():
        expected = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        calls = []
        hooks = [b.register_forward_hook(lambda *a, k=k: calls.append(k)) for k, b in enumerate(model._blocks())]
        try:
            got = model.hidden_states(ids, mask)
        finally:
            for hook in hooks:
                hook.remove()
    if layer < 2:  # HF's last hidden state has the final norm applied; a block's own output does not
        torch.testing.assert_close(got[0], expected)
    assert calls == list(range(layer))  # no block above the chosen one ran
    with pytest.raises(ValueError, match=r"has 2 blocks: choose 1\.\.2"):
        RewardModel(config(tiny_model, layer=3))
    with pytest.raises(ValueError, match="layer must be None"):
        RewardModelConfig(layer=0)


def test_several_layers_are_pooled_side_by_side_in_one_pass(tiny_model: Path, tmp_path: Path) -> None:
    """layer=[1, 2]: each block's pooled state, concatenated in the order given, from one backbone pass."""
    both = RewardModel(config(tiny_model, layer=[2, 1]))
    one, two = RewardModel(config(tiny_model, layer=1)), RewardModel(config(tiny_model, layer=2))
    prompts, texts = ["the movie was", "a sad , dull"], ["good", "so awful and bad ok"]
    with torch.no_grad():
        got = both.features(prompts, texts)
        torch.testing.assert_close(got, torch.cat([two.features(prompts, texts), one.features(prompts, texts)], -1))
    assert both.head.mean.numel() == 2 * one.head.mean.numel()
    trained, _ = train_reward_model(sentiment_pairs(40, 1), config(tiny_model, layer=[1, 2]), progress=False)
    loaded = RewardModel.load(trained.save(tmp_path / "rm"))
    assert loaded.config.layer == [1, 2]
    np.testing.assert_allclose(loaded.score(prompts, texts), trained.score(prompts, texts), atol=1e-6)
    for bad in ([], [1, 1], [0, 2], [1, True]):
        with pytest.raises(ValueError, match="list of distinct ones"):
            RewardModelConfig(layer=bad)


def test_saved_layer_and_scale_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    model, _ = train_reward_model(sentiment_pairs(40, 1), config(tiny_model, layer=1), progress=False)
    loaded = RewardModel.load(model.save(tmp_path / "rm"))
    assert loaded.config.layer == 1 and float(loaded.head.out_gain) == float(model.head.out_gain) != 1.0
    texts = ["it was wonderful", "so awful and bad"]
    np.testing.assert_allclose(loaded.score(["p", "p"], texts), model.score(["p", "p"], texts), atol=1e-6)


# --- evaluation ------------------------------------------------------------------------------------------------


def test_evaluate_hand_computed() -> None:
    pairs = [
        PreferencePair("p", "a", "b"),  # model right;  gold agrees with the model
        PreferencePair("p", "c", "d"),  # model wrong;  gold prefers c: model disagrees with gold
        PreferencePair("p", "e", "f"),  # model right;  gold tie: left out of gold accuracy
        PreferencePair("p", "g", "h"),  # model wrong (label noise); gold prefers h like the model
    ]
    model = TableScorer({"a": 3, "b": 1, "c": 2, "d": 4, "e": 5, "f": 0, "g": 1, "h": 6})
    gold = TableScorer({"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.2, "e": 0.3, "f": 0.3, "g": 0.1, "h": 0.9})
    report = evaluate_reward_model(model, pairs, gold)
    assert report.n_heldout == 4
    assert report.accuracy == 0.5
    assert report.gold_accuracy == pytest.approx(2 / 3)
    # Spearman over chosen then rejected, ties at their average rank:
    # model [3, 2, 5, 1, 1, 4, 0, 6] -> ranks [5, 4, 7, 2.5, 2.5, 6, 1, 8]
    # gold [1, .5, .3, .1, 0, .2, .3, .9] -> ranks [8, 6, 4.5, 2, 1, 3, 4.5, 7]
    expected = np.corrcoef([5, 4, 7, 2.5, 2.5, 6, 1, 8], [8, 6, 4.5, 2, 1, 3, 4.5, 7])[0, 1]
    assert report.spearman == pytest.approx(expected)
    stats = pytest.importorskip("scipy.stats")
    rho = stats.spearmanr([3, 2, 5, 1, 1, 4, 0, 6], [1, 0.5, 0.3, 0.1, 0, 0.2, 0.3, 0.9])[0]
    assert report.spearman == pytest.approx(rho)


def test_evaluate_without_gold_and_degenerate_cases() -> None:
    model = TableScorer({"a": 1.0, "b": 1.0, "c": 2.0})
    report = evaluate_reward_model(model, [PreferencePair("p", "a", "b"), PreferencePair("p", "c", "a")])
    assert report.accuracy == 0.5  # a tie counts as a miss
    assert math.isnan(report.gold_accuracy) and math.isnan(report.spearman)
    tied_gold = TableScorer({"a": 0.0, "b": 0.0, "c": 0.0})  # every pair ties on gold: both undefined
    report = evaluate_reward_model(model, [PreferencePair("p", "a", "c")], tied_gold)
    assert math.isnan(report.gold_accuracy) and math.isnan(report.spearman)


# --- scoring, save and load ------------------------------------------------------------------------------------


def test_score_shape_dtype_and_empty_completion(head_model: tuple) -> None:
    model = head_model[0]
    prompts = ["the movie was", "the movie was", "a sad , dull", ""]
    scores = model.score(prompts, ["", "good", "x" * 400, "great"], batch_size=3)  # two batches; one too long
    assert scores.dtype == np.float64 and scores.shape == (4,) and np.all(np.isfinite(scores))
    assert model.score([], []).shape == (0,)
    assert np.allclose(model.score(prompts[:2], ["", "good"]), scores[:2], atol=1e-5)  # batching does not matter


@pytest.mark.parametrize("mode", ["head", "lora", "full"])
def test_save_load_identical_and_pickle_free(trained: dict, tmp_path: Path, mode: str) -> None:
    model = copy.deepcopy(trained[mode][0])  # the fixture's stays as trained
    with torch.no_grad():  # what training may have kept at its start (LoRA's B = 0): moved, so a lost tensor shows
        for name, param in model.backbone.named_parameters():
            if param.requires_grad and ("lora_B" in name or mode == "full"):
                param.add_(0.05 * torch.randn_like(param))
    path = model.save(tmp_path / f"rm-{mode}")
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"reward_model.json", "head.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
    assert ("backbone/model.safetensors" in files) == (mode == "full")
    assert any(f.startswith("adapter/") and f.endswith(".safetensors") for f in files) == (mode == "lora")

    loaded = RewardModel.load(path)
    assert loaded.config == model.config and not loaded.training
    prompts = ["the movie was", "great acting and", "a sad , dull"]
    completions = ["it was wonderful", "", "so awful and bad"]
    np.testing.assert_allclose(loaded.score(prompts, completions), model.score(prompts, completions), atol=1e-6)


def test_load_errors(tmp_path: Path) -> None:
    (tmp_path / "head.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a reward-model directory: it needs reward_model\.json.*train-rm"):
        RewardModel.load(tmp_path)
    with pytest.raises(ModelLoadError, match="not a reward-model directory"):
        RewardModel.load(tmp_path / "missing")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: (d / "reward_model.json").write_text("{not json"), r"reward_model\.json is not valid JSON"),
        (lambda d: (d / "reward_model.json").write_text("[]"), r"reward_model\.json must hold a JSON object"),
        (
            lambda d: _edit_json(d, pooling="mean", dropout=0.1),
            r"unknown key\(s\) \['dropout'\]; the allowed keys are \['backbone', 'ensemble', 'head_hidden'",
        ),
        (lambda d: _edit_json(d, head_hidden="8"), r"'head_hidden' must be int, got '8' \(str\)"),
        (lambda d: _edit_json(d, mode="adapter"), r"mode must be one of \('head', 'lora', 'full'\), not 'adapter'"),
        (lambda d: (d / "head.safetensors").write_bytes(b"\x00" * 7), r"head\.safetensors is not a valid safetensors"),
        (
            lambda d: save_file({"w": torch.zeros(2)}, d / "head.safetensors"),
            r"holds no 'mean' tensor",
        ),
        (lambda d: _edit_json(d, head_hidden=8), r"does not fit the head described in .*\(head_hidden=8\)"),
    ],
    ids=["json", "not-object", "unknown-key", "wrong-type", "bad-mode", "head-bytes", "head-keys", "head-shape"],
)
def test_load_corrupted_directory(
    head_model: tuple, tmp_path: Path, corrupt: Callable[[Path], object], message: str
) -> None:
    path = head_model[0].save(tmp_path / "rm")
    corrupt(path)
    with pytest.raises(ModelLoadError, match=message) as err:
        RewardModel.load(path)
    assert str(path) in str(err.value) and ("RewardModel.save" in str(err.value) or "backbone" in str(err.value))


def _edit_json(path: Path, **changes: object) -> None:
    config = json.loads((path / "reward_model.json").read_text())
    (path / "reward_model.json").write_text(json.dumps({**config, **changes}))


def test_load_head_of_another_backbone(head_model: tuple, tmp_path: Path) -> None:
    """The head scores the tiny model's 32-dim features; a 16-dim backbone used to fail at the first episode end."""
    path = head_model[0].save(tmp_path / "rm")
    _edit_json(path, backbone=str(make_tiny_model(tmp_path / "narrow", hidden_size=16)))
    message = r"head\.safetensors scores 32-dim features, but the backbone .*narrow' has hidden size 16"
    with pytest.raises(ModelLoadError, match=message):
        RewardModel.load(path)


def test_load_relative_backbone_from_another_directory(head_model: tuple, tmp_path: Path, monkeypatch) -> None:
    """A reward model shipped next to its backbone (``"backbone": "../lm"``) loads from any working directory."""
    model = head_model[0]
    shutil.copytree(model.config.backbone, tmp_path / "bundle" / "lm")
    path = model.save(tmp_path / "bundle" / "rm")
    _edit_json(path, backbone="../lm")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = RewardModel.load(path)
    assert Path(loaded.config.backbone) == (tmp_path / "bundle" / "lm").resolve()
    prompts, completions = ["the movie was", "a sad , dull"], ["it was wonderful", "so awful"]
    np.testing.assert_allclose(loaded.score(prompts, completions), model.score(prompts, completions), atol=1e-6)


@pytest.mark.parametrize(("field", "value"), [("mode", "x"), ("pooling", "y")])
def test_invalid_config(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be one of .*'{value}'"):
        RewardModelConfig(**{field: value})


# --- ensembles ----------------------------------------------------------------------------------------------------

ENSEMBLE_PAIRS = 120  # 84 train / 12 validation / 24 test pairs


@pytest.fixture(scope="module")
def ensemble(tiny_model: Path) -> tuple[RewardModel, object]:
    """Three heads on the tiny backbone's features, each fitted on a bootstrap of the train split."""
    pairs = sentiment_pairs(ENSEMBLE_PAIRS, seed=0)
    return train_reward_model(pairs, config(tiny_model, ensemble=3), gold=WordGold(), progress=False)


def train_texts(n_pairs: int) -> tuple[list[str], list[str]]:
    """The completions the scale is normalised on: the train split's chosen, then rejected (as train_reward_model)."""
    train, _, _ = split_pairs(sentiment_pairs(n_pairs, seed=0), 0.1, 0.2, seed=0)
    return [p.prompt for p in train] * 2, [p.chosen for p in train] + [p.rejected for p in train]


def test_aggregation_math_hand_computed() -> None:
    members = torch.tensor([[0.0, 1.0], [3.0, 1.0], [6.0, 4.0]])  # 3 members x 2 texts
    # mean [3, 2]; population variance [(9 + 0 + 9) / 3, (1 + 1 + 4) / 3] = [6, 2]; min [0, 1]
    assert aggregate_scores(members, "mean").tolist() == [3.0, 2.0]
    assert aggregate_scores(members, "min").tolist() == [0.0, 1.0]
    assert aggregate_scores(members, "mean_minus_var", lam=0.5).tolist() == [0.0, 1.0]
    assert aggregate_scores(members, "mean_minus_var", lam=0.0).tolist() == [3.0, 2.0]
    one = torch.tensor([[0.25, -1.5]])  # a single member: every aggregation is the member itself
    for how in AGGREGATES:
        assert torch.equal(aggregate_scores(one, how, lam=3.0), one[0])


def test_ensemble_trains_and_reports_each_member(ensemble: tuple) -> None:
    model, report = ensemble
    assert len(model.heads) == report.ensemble == len(report.members) == 3
    assert report.accuracy >= 0.9 and report.gold_accuracy_large_gap >= 0.9 and report.spearman > 0.5
    assert math.isnan(report.weight_decay) and report.history == []  # each member chose its own decay
    for member in report.members:
        assert (member.n_train, member.n_validation, member.n_heldout) == (84, 12, 24)
        assert member.weight_decay in WEIGHT_DECAYS and len(member.history) == len(WEIGHT_DECAYS)
        assert 0.0 <= member.accuracy <= 1.0 and -1.0 <= member.spearman <= 1.0 and member.members == []
    weights = [head.net.weight.detach() for head in model.heads]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])  # bootstraps differ
    # the report's ensemble numbers are those of model.score (the mean aggregation)
    _, _, test = split_pairs(sentiment_pairs(ENSEMBLE_PAIRS, seed=0), 0.1, 0.2, seed=0)
    again = evaluate_reward_model(model, test, WordGold())
    assert (again.accuracy, again.spearman) == (report.accuracy, report.spearman)


@pytest.mark.parametrize(("aggregate", "lam"), [("mean", 0.5), ("min", 0.5), ("mean_minus_var", 2.0)])
def test_ensemble_normalised_for_each_aggregation(ensemble: tuple, aggregate: str, lam: float) -> None:
    """Each member and the aggregated score score mean 0, std 1 on the samples the scale was fitted on."""
    model = ensemble[0]
    prompts, texts = train_texts(ENSEMBLE_PAIRS)
    members = model.member_scores(prompts, texts)
    assert members.shape == (3, len(texts)) and members.dtype == np.float64
    assert model.member_scores([], []).shape == (3, 0) and model.score([], []).shape == (0,)
    np.testing.assert_allclose(members.mean(1), 0.0, atol=1e-4)
    np.testing.assert_allclose(members.std(1), 1.0, atol=1e-4)
    model.set_aggregate(aggregate, lam)
    try:
        scores = model.score(prompts, texts)
        unscaled = aggregate_scores(torch.from_numpy(members), aggregate, lam).numpy()
    finally:
        model.set_aggregate("mean")
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1.0) < 1e-4
    if aggregate != "mean":  # without the aggregate's own scale, min and mean - var would shift the mean
        assert unscaled.mean() < -1e-3
    assert np.array_equal(np.argsort(unscaled, kind="stable"), np.argsort(scores, kind="stable"))


def test_single_head_normalised_and_aggregation_free(head_model: tuple) -> None:
    """One head: member_scores is its score, and every aggregation scores the same as before ensembles existed."""
    model = head_model[0]
    prompts, texts = train_texts(200)
    scores = model.score(prompts, texts)
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1.0) < 1e-4
    assert np.array_equal(model.member_scores(prompts[:8], texts[:8]), scores[None, :8])
    with torch.no_grad():
        expected = model.head(model.features(prompts[:8], texts[:8])).double().numpy()
    for aggregate in AGGREGATES:
        model.set_aggregate(aggregate, lam=5.0)
        assert np.array_equal(model.score(prompts[:8], texts[:8]), expected)
    model.set_aggregate("mean")


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_ensemble_save_load_identical(ensemble: tuple, tmp_path: Path, aggregate: str) -> None:
    model = ensemble[0]
    path = model.save(tmp_path / "rm")
    assert sorted(p.name for p in path.iterdir()) == ["head.safetensors", "reward_model.json"]  # one directory
    assert json.loads((path / "reward_model.json").read_text())["ensemble"] == 3
    keys = set(load_file(path / "head.safetensors"))
    assert {"0.mean", "2.net.weight", "calibration"} <= keys and "mean" not in keys  # K heads, one backbone
    loaded = RewardModel.load(path, aggregate=aggregate, lam=0.7)
    assert (loaded.aggregate, loaded.lam, len(loaded.heads)) == (aggregate, 0.7, 3)
    prompts, completions = ["the movie was", "great acting and", "a sad , dull"], ["it was wonderful", "", "so bad"]
    model.set_aggregate(aggregate, lam=0.7)
    try:
        assert np.array_equal(loaded.score(prompts, completions), model.score(prompts, completions))
    finally:
        model.set_aggregate("mean")
    assert np.array_equal(loaded.member_scores(prompts, completions), model.member_scores(prompts, completions))


def test_single_head_saves_as_before(head_model: tuple, tmp_path: Path) -> None:
    """K = 1 writes the files of earlier versions (no 'ensemble' key, unprefixed tensors), byte for byte again."""
    first = head_model[0].save(tmp_path / "a")
    assert "ensemble" not in json.loads((first / "reward_model.json").read_text())
    assert set(load_file(first / "head.safetensors")) == {"mean", "std", "out_gain", "out_bias", "net.weight",
                                                          "net.bias"}  # fmt: skip
    second = RewardModel.load(first).save(tmp_path / "b")
    for name in ("reward_model.json", "head.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    _edit_json(first, ensemble=1)  # written explicitly, it means the same
    assert RewardModel.load(first).config == head_model[0].config
    # the shipped default reward model's files still parse as one head (its backbone is not loaded here)
    shipped = Path(text_env.get_task("positive-review").reward_model)
    assert _read_config(shipped / "reward_model.json").ensemble == 1
    members, calibration = _read_heads(shipped / "head.safetensors", 1)
    assert len(members) == 1 and calibration is None and "net.weight" in members[0]


def test_ensemble_bad_input(ensemble: tuple, tiny_model: Path, tmp_path: Path) -> None:
    allowed = r"aggregate must be one of \('mean', 'min', 'mean_minus_var'\), not 'median'"
    with pytest.raises(ValueError, match=allowed):
        aggregate_scores(torch.zeros(2, 3), "median")
    with pytest.raises(ValueError, match=allowed):  # before anything is loaded
        RewardModel.load(tmp_path / "missing", aggregate="median")
    with pytest.raises(ValueError, match=r"lam .* must be a finite number >= 0, not -1"):
        ensemble[0].set_aggregate("mean_minus_var", lam=-1)
    with pytest.raises(ValueError, match=r"ensemble must be a number of heads >= 1, not 0"):
        RewardModelConfig(ensemble=0)
    with pytest.raises(ValueError, match=r"ensemble=2 needs mode='head'"):
        RewardModelConfig(mode="lora", ensemble=2)
    path = ensemble[0].save(tmp_path / "rm")
    _edit_json(path, ensemble=2)  # the file holds three members
    with pytest.raises(ModelLoadError, match=r"holds '2\.mean', but reward_model\.json says ensemble=2"):
        RewardModel.load(path)
    _edit_json(path, ensemble=4)
    with pytest.raises(ModelLoadError, match=r"lacks member\(s\) \[3\] of the ensemble of 4 heads"):
        RewardModel.load(path)


def test_ensemble_as_env_reward_with_aggregation(ensemble: tuple, tiny_model: Path, tmp_path: Path) -> None:
    path = ensemble[0].save(tmp_path / "rm")
    kwargs = dict(model=str(tiny_model), prompts=TINY_PROMPTS, max_new_tokens=3, max_prompt_tokens=24)
    env = gym.make("TextGen-v0", reward_model=str(path), reward_kwargs={"aggregate": "min"}, **kwargs)
    env.action_space.seed(0)
    env.reset(seed=0)
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    reference = RewardModel.load(path, aggregate="min")
    assert reward == pytest.approx(reference.score([info["prompt"]], [info["completion"]])[0], abs=1e-6)
    env.close()
    venv = text_env.make_text_vec_env(2, reward_model=str(path), reward_kwargs={"aggregate": "mean_minus_var",
                                                                                  "lam": 1.5}, **kwargs)  # fmt: skip
    assert (venv.core.reward_model.aggregate, venv.core.reward_model.lam) == ("mean_minus_var", 1.5)
    with pytest.raises(ValueError, match=r"reward_kwargs .* apply to a reward-model directory.*'gold'"):
        gym.make("TextGen-v0", reward_model="gold", reward_kwargs={"aggregate": "min"}, **kwargs)


def test_train_rm_ensemble_command(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agents.cli import main

    data, out = tmp_path / "prefs.jsonl", tmp_path / "rm"
    append_pairs(data, sentiment_pairs(40, seed=4))
    main(["train-rm", "--data", str(data), "--out", str(out), "--backbone", str(tiny_model), "--ensemble", "3"])
    printed = capsys.readouterr().out
    assert "ensemble of 3 heads, scored above by their mean" in printed and printed.count("weight decay") == 3
    report = json.loads((out / "report.json").read_text())  # NaN (the shared weight decay) is written as null
    assert report["ensemble"] == 3 and report["weight_decay"] is None and len(report["members"]) == 3
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["weight_decay"] in WEIGHT_DECAYS for m in report["members"])
    model = RewardModel.load(out, aggregate="min")
    assert len(model.heads) == 3 and model.score(["the movie was"], ["good"]).shape == (1,)
    for bad, message in [("0", "ensemble must be a number of heads >= 1, not 0"), ("2 --mode lora", "needs mode")]:
        with pytest.raises(SystemExit) as exit_:
            main(["train-rm", "--data", str(data), "--out", str(out), "--backbone", str(tiny_model), "--ensemble",
                  *bad.split()])  # fmt: skip
        assert exit_.value.code == 1 and message in capsys.readouterr().err


# --- as the env's reward --------------------------------------------------------------------------------------


def test_reward_model_directory_as_env_reward(trained: dict, tiny_model: Path, tmp_path: Path) -> None:
    rm_dir = trained["head"][0].save(tmp_path / "rm")
    env = gym.make(
        "TextGen-v0", model=str(tiny_model), prompts=TINY_PROMPTS, reward_model=str(rm_dir), max_new_tokens=4,
        max_prompt_tokens=24,
    )  # fmt: skip
    env.action_space.seed(0)
    reference = RewardModel.load(rm_dir)
    for episode in range(2):
        env.reset(seed=episode)
        rewards, done = [], False
        while not done:
            _, reward, terminated, truncated, info = env.step(env.action_space.sample())
            rewards.append(reward)
            done = terminated or truncated
        assert rewards[:-1] == [0.0] * (len(rewards) - 1)  # the reward comes at the end of the episode
        expected = reference.score([info["prompt"]], [info["completion"]])[0]
        assert rewards[-1] == pytest.approx(expected, abs=1e-6)
        assert info["reward_model_score"] == rewards[-1] and math.isfinite(info["gold_score"])
    env.close()


@pytest.mark.default_model
@pytest.mark.parametrize("task_name", shipped_reward_models.shipped_tasks())
def test_shipped_reward_model_is_reproducible(tmp_path: Path, task_name: str) -> None:
    """The commands of pretrained/<task>/HOW_MADE.md still make the shipped model, checked on a fixed sample against
    what tests/shipped_reward_models.py recorded (refitting on all 10,000 pairs takes 10 minutes; it stays one
    command, in HOW_MADE.md):

    - ``textgen preferences`` still samples and labels pairs;
    - this machine's backbone features of the sample's texts are the recorded ones, and the shipped head scores them
      as recorded: the features the head was fitted on are what a user's machine computes;
    - ``textgen train-rm`` with HOW_MADE.md's options on the first 256 shipped pairs makes the recorded model: its
      test accuracy within 3 binomial standard errors, its scores of the sample ranked the same. The default task's
      model only: the 512 texts' backbone features are 80 % of the test's time (66 s of 84 on one AVX2 core), the
      fitting code is every task's, and each task's own data and features are the checks above.

    The tolerances hold on any CPU: bf16 kernels of different CPUs (AMX or AVX-512) move the features far less than
    bf16 against float32 does (0.5 % of their norm, 0.02 in score), and the head is fitted to convergence (a random
    0.5 % perturbation of every feature moved the refit's test accuracy by one pair and its scores by 0.015).
    """
    from agents.cli import main
    from text_env.rewards.preferences import load_preferences

    assert DEFAULT_TASK in shipped_reward_models.shipped_tasks()  # so some parameter refits
    record, recorded_features = shipped_reward_models.load_record(task_name)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a real 135M model, unlike the rest of the suite
    try:
        fresh_pairs = tmp_path / "new.jsonl"
        main(["preferences", "--task", task_name, "--pairs", "4", "--out", str(fresh_pairs), "--batch-size", "8"])
        assert len(load_preferences(fresh_pairs)) == 4
        prompts, texts = shipped_reward_models.sample(task_name)
        shipped = RewardModel.load(shipped_reward_models.shipped_dir(task_name))
        features = shipped_reward_models.features(shipped, prompts, texts)
        with torch.no_grad():
            recorded_scores = shipped.combine(shipped.member_outputs(recorded_features)).numpy()
        shipped_scores = shipped.score(prompts, texts)
        if task_name == DEFAULT_TASK:
            data = shipped_reward_models.refit_data(task_name, tmp_path / "pairs.jsonl")
            main(shipped_reward_models.train_rm_argv(task_name, data, tmp_path / "rm"))
            refit_scores = RewardModel.load(tmp_path / "rm").score(prompts, texts)
    finally:
        torch.set_num_threads(threads)
    relative = (features - recorded_features).norm(dim=-1) / recorded_features.norm(dim=-1)  # (16,)
    assert relative.max() < 0.02, relative
    np.testing.assert_allclose(recorded_scores, record["shipped_scores"], atol=1e-4)  # the head, as shipped
    np.testing.assert_allclose(shipped_scores, record["shipped_scores"], atol=0.05)
    if task_name != DEFAULT_TASK:
        return
    report, was = json.loads((tmp_path / "rm" / "report.json").read_text()), record["refit_report"]
    assert report["n_heldout"] == was["n_heldout"]
    se = math.sqrt(was["accuracy"] * (1 - was["accuracy"]) / was["n_heldout"])  # binomial standard error
    assert abs(report["accuracy"] - was["accuracy"]) <= 3 * se, (report, was)
    assert _spearman(refit_scores, np.array(record["refit_scores"])) > 0.95


def test_scoring_runs_bf16_matmuls_on_bucketed_rows(head_model: tuple) -> None:
    """Episode-end scoring sees batches of every rows x tokens; each bf16 matmul shape would cost a cached oneDNN
    kernel, so the reward model's forward pads rows to bucket_rows like the policy's re-encodes."""
    from torch.overrides import TorchFunctionMode

    from text_env.models import bucket_rows

    seen: list[int] = []

    class Rows(TorchFunctionMode):  # what reaches the kernels, beneath the bucketing
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.nn.functional.linear and torch.is_autocast_enabled("cpu"):  # the head runs in float32
                seen.append(args[0].numel() // args[0].shape[-1])
            return func(*args, **(kwargs or {}))

    model = head_model[0]
    default, model.bf16 = model.bf16, True  # bf16 whatever this CPU's default (off where it has no bf16 kernels)
    try:
        with Rows():
            model.score(["the movie was", "a sad , dull", "great"], ["it was good", "", "so awful and bad ok"])
    finally:
        model.bf16 = default
    assert seen and all(rows == bucket_rows(rows) for rows in seen), seen


def _texts(pairs: list[PreferencePair]) -> set[tuple[str, str]]:
    return {(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)}


@pytest.mark.parametrize("ensemble_size", [1, 3])
def test_cached_features_fit_the_same_reward_model(tiny_model: Path, ensemble_size: int) -> None:
    """``train_reward_model(features=FeatureCache(...))`` (textgen rlhf's refits) fits and reports what a fit that runs
    the backbone itself does, and computes each text's features once: a second fit on more pairs only adds theirs."""
    pairs, cfg = sentiment_pairs(60, seed=0), config(tiny_model, pooling="mean", ensemble=ensemble_size)
    plain, plain_report = train_reward_model(pairs, cfg, gold=WordGold(), progress=False)
    cache = FeatureCache(RewardModel(cfg))
    cached, cached_report = train_reward_model(pairs, cfg, gold=WordGold(), progress=False, features=cache)
    assert len(cache.table) == len(_texts(pairs))  # every distinct completion once
    assert cached_report.accuracy == plain_report.accuracy and cached_report.spearman == pytest.approx(
        plain_report.spearman, abs=1e-6
    )
    prompts, texts = [p.prompt for p in pairs], [p.chosen for p in pairs]
    np.testing.assert_allclose(cached.score(prompts, texts), plain.score(prompts, texts), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(CachedHeads(cached, cache).score(prompts, texts), cached.score(prompts, texts),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    more = pairs + sentiment_pairs(10, seed=5)
    train_reward_model(more, cfg, progress=False, features=cache)
    assert len(cache.table) == len(_texts(more))
    with pytest.raises(ValueError, match="cannot read"):
        train_reward_model(pairs, config(tiny_model, pooling="last"), progress=False, features=cache)


def test_preloaded_features_are_computed_once_per_machine(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`textgen rlhf` preloads its base pairs' features: the first run computes and writes them to the user's cache,
    later runs (other seeds, a resume) read the same numbers back without running the backbone; other settings, other
    file."""
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path))
    pairs, cfg = sentiment_pairs(12, seed=0), config(tiny_model, pooling="mean")
    first = FeatureCache(RewardModel(cfg))
    file = first.preload(pairs)
    assert file.parent == tmp_path / "features" and len(first.table) == len(_texts(pairs))
    again = FeatureCache(RewardModel(cfg))
    monkeypatch.setattr(again.model, "features", lambda *a: pytest.fail("the backbone ran for a cached text"))
    assert again.preload(pairs) == file
    for key, value in first.table.items():
        assert torch.equal(again.table[key], value)
    assert FeatureCache(RewardModel(config(tiny_model, pooling="last"))).preload(pairs) != file
    assert FeatureCache(RewardModel(cfg)).preload(pairs[:-1]) != file
