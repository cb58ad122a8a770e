"""`textgen rlhf`, the iterated loop, on the tiny LM: a 2-round run writes every artefact and its refit is what
train-rm would fit on the same pairs; a run killed at any step resumes without losing or repeating a label; a human
labels a round from stdin; bad options are one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.callbacks import TextMetrics
from agents.cli import main
from agents.rlhf import LOOP_BETA, RLHFConfig, rlhf
from agents.run import TrainConfig
from agents.train import Interrupted
from text_env.rewards import training as reward_training
from text_env.rewards.annotators import SimulatedAnnotator
from text_env.rewards.preferences import PreferencePair, append_pairs, load_preferences
from text_env.rewards.reward_model import RewardModel, RewardModelConfig
from text_env.rewards.training import train_reward_model
from text_env.tasks import get_task

ROUNDS, TOKENS, PAIRS = 2, 16, 4  # 2 rollouts of 2 envs x 4 steps per round
TINY = dict(n_envs=2, n_steps=4, batch_size=8, n_epochs=1, max_new_tokens=4, max_prompt_tokens=128, eval_prompts=2,
            bf16=False, checkpoint_every=1)  # fmt: skip
TINY_ARGS = ["--n-envs", "2", "--n-steps", "4", "--batch-size", "8", "--n-epochs", "1", "--max-new-tokens", "4",
             "--max-prompt-tokens", "128", "--eval-prompts", "2", "--no-bf16"]  # fmt: skip


@pytest.fixture(scope="module")
def round0_rm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head reward model on the tiny LM, with the 12 pairs it was fitted on beside it (as the shipped one has)."""
    rng = random.Random(0)
    prompts = get_task("positive-review").train_prompts
    words = [("good", "bad"), ("great", "awful"), ("fine", "dull")] * 4
    pairs = [PreferencePair(rng.choice(prompts), f"a {g} film", f"a {b} film") for g, b in words]
    model, _ = train_reward_model(pairs, RewardModelConfig(backbone=str(tiny_model)), progress=False)
    path = model.save(tmp_path_factory.mktemp("rm0") / "rm")
    append_pairs(path / "prefs.jsonl", pairs)
    return path


def loop_config(tiny_model: Path, rm: Path, out: Path, **loop: Any) -> RLHFConfig:
    train = TrainConfig(model=str(tiny_model), reward_model=str(rm), out=str(out), **TINY)  # type: ignore[arg-type]
    return RLHFConfig(train, **{"rounds": ROUNDS, "tokens_per_round": TOKENS, "pairs_per_round": PAIRS, **loop})


@pytest.fixture(scope="module")
def straight(tiny_model: Path, round0_rm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-round run with the simulated annotator (run once for the module)."""
    return rlhf(loop_config(tiny_model, round0_rm, tmp_path_factory.mktemp("straight")), verbose=0)


def round_prompts(run_dir: Path) -> list[list[str]]:
    return [[p.prompt for p in load_preferences(run_dir / f"round-{r}" / "pairs.jsonl")] for r in (1, 2)]


def test_two_rounds_write_every_artefact(straight: dict[str, Any], round0_rm: Path) -> None:
    run_dir = Path(straight["run_dir"])
    assert run_dir.name.startswith("rlhf-positive-review-")
    for name in ("config.json", "report.json", "report.md", "round-0/report.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "rlhf.png").stat().st_size > 10_000 and not (run_dir / "checkpoint").exists()
    for r in (1, 2):
        d = run_dir / f"round-{r}"
        rm = ("reward_model/head.safetensors", "reward_model/reward_model.json", "reward_model/report.json")
        for name in ("checkpoint/model.zip", "checkpoint/state.json", "eval.json", "pairs.jsonl", "report.json", *rm):
            assert (d / name).is_file(), f"round-{r}/{name}"
        assert len(load_preferences(d / "pairs.jsonl")) == PAIRS
        assert json.loads((d / "checkpoint" / "state.json").read_text())["num_timesteps"] == r * TOKENS

    rounds = straight["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["reward_model"] for r in rounds] == [str(round0_rm), str(round0_rm), "round-1/reward_model"]
    for r in rounds:
        assert {"gold_score", "reward_model_score", "kl", "distinct_2"} <= set(r["eval"])
    for k, r in enumerate(rounds[1:], start=1):
        assert r["previous_reward_model_on_fresh_pairs"]["n_heldout"] == PAIRS  # judged where the policy went
        assert r["refit"]["n_pairs"] == 12 + k * PAIRS and r["refit"]["n_base_pairs"] == 12  # every pair so far
        assert r["refit"]["seconds"] > 0 and r["pairs"]["new"] == PAIRS
        assert [h["timesteps"] for h in r["history"]] == [(k - 1) * TOKENS + 8.0, k * TOKENS]
        assert all("kl" in h for h in r["history"])  # what the √KL plot draws
    table = (run_dir / "report.md").read_text()
    assert table.startswith("| round | reward model | gold |") and "| 2 | round-1/reward_model |" in table


def test_round_two_is_scored_by_round_ones_refit(straight: dict[str, Any]) -> None:
    """The env's reward in round 2 is round 1's refit: the held-out reward-model score is that model's score."""
    run_dir = Path(straight["run_dir"])
    evaluation = json.loads((run_dir / "round-2" / "eval.json").read_text())
    refit = RewardModel.load(run_dir / "round-1" / "reward_model")
    scores = refit.score(evaluation["prompts"], evaluation["completions"])
    assert evaluation["summary"]["reward_model_score"] == pytest.approx(scores.mean(), abs=1e-4)


def test_refit_is_train_rm_on_all_pairs_so_far(straight: dict[str, Any], round0_rm: Path, tiny_model: Path) -> None:
    """Same split, head fit and output scale (the train split's completions: mean 0, std 1) as train_reward_model."""
    run_dir = Path(straight["run_dir"])
    pairs = [*load_preferences(round0_rm / "prefs.jsonl")] + [
        p for r in (1, 2) for p in load_preferences(run_dir / f"round-{r}" / "pairs.jsonl")
    ]
    expected, report = train_reward_model(pairs, RewardModelConfig(backbone=str(tiny_model)), progress=False)
    refit = RewardModel.load(run_dir / "round-2" / "reward_model")
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompts = [p.prompt for p in pairs] * 2
    np.testing.assert_allclose(refit.score(prompts, texts), expected.score(prompts, texts), atol=2e-3)
    saved = json.loads((run_dir / "round-2" / "reward_model" / "report.json").read_text())
    assert (saved["n_train"], saved["n_validation"], saved["n_heldout"]) == (
        report.n_train, report.n_validation, report.n_heldout
    )  # fmt: skip


def test_an_ensemble_stays_an_ensemble_through_the_refits(tiny_model: Path, round0_rm: Path, tmp_path: Path) -> None:
    """An ensemble round-0 reward model is refitted as an ensemble of as many heads, aggregated as the run says
    (here the worst case), exactly as train_reward_model would fit one on the same pairs."""
    pairs = load_preferences(round0_rm / "prefs.jsonl")
    config = RewardModelConfig(backbone=str(tiny_model), ensemble=3)
    model, _ = train_reward_model(pairs, config, progress=False)
    rm = model.save(tmp_path / "ensemble")
    append_pairs(rm / "prefs.jsonl", pairs)
    loop = loop_config(tiny_model, rm, tmp_path / "runs", rounds=1)
    loop.train.reward_aggregate = "min"
    run_dir = Path(rlhf(loop, verbose=0)["run_dir"])
    refit = RewardModel.load(run_dir / "round-1" / "reward_model", aggregate="min")
    assert len(refit.heads) == 3
    all_pairs = pairs + load_preferences(run_dir / "round-1" / "pairs.jsonl")
    expected, _ = train_reward_model(all_pairs, config, progress=False)
    expected.set_aggregate("min")
    texts = [p.chosen for p in all_pairs] + [p.rejected for p in all_pairs]
    prompts = [p.prompt for p in all_pairs] * 2
    np.testing.assert_allclose(refit.score(prompts, texts), expected.score(prompts, texts), atol=2e-3)


def _kill_on_call(count: int) -> Callable[..., Any]:
    """A wrapper that sends this process SIGTERM on its ``count``-th call (as `kill PID` would), then carries on."""
    calls = 0

    def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == count:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        return wrapper

    return wrap


def _steps(path: Path) -> int:
    return json.loads(path.read_text())["num_timesteps"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize(
    ("owner", "name", "count", "left"),
    [(TextMetrics, "_on_rollout_end", 1,  # SIGTERM in round 1's 1st rollout: checkpoint at its end, no round saved
      lambda d: _steps(d / "checkpoint/state.json") == 8 and not (d / "round-1/checkpoint").exists()),
     (SimulatedAnnotator, "label", PAIRS + 2,  # at round 2's 2nd label: round 1 done, one label of round 2 kept
      lambda d: (d / "round-1/report.json").is_file() and _lines(d / "round-2/pairs.jsonl") == 1),
     (reward_training, "fit_heads", 2,  # in round 2's refit: every label of round 2 kept, no refit saved
      lambda d: _lines(d / "round-2/pairs.jsonl") == PAIRS and not (d / "round-2/reward_model").exists())],
    ids=["ppo", "labelling", "refit"],
)  # fmt: skip
def test_killed_run_resumes_with_no_label_lost_or_repeated(
    straight: dict[str, Any], tiny_model: Path, round0_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    owner: Any, name: str, count: int, left: Callable[[Path], bool],
) -> None:  # fmt: skip
    """SIGTERM (as `kill PID` sends) at a step of the loop: it stops with what is saved; --resume finishes it."""
    monkeypatch.setattr(owner, name, _kill_on_call(count)(getattr(owner, name)))
    with pytest.raises(Interrupted, match="Continue with: textgen rlhf --resume"):
        rlhf(loop_config(tiny_model, round0_rm, tmp_path), verbose=0)
    monkeypatch.undo()
    (run_dir,) = tmp_path.iterdir()
    assert left(run_dir) and not (run_dir / "report.json").exists()

    resumed = rlhf(resume=run_dir, verbose=0)
    assert round_prompts(run_dir) == round_prompts(Path(straight["run_dir"]))  # the same prompts, each once
    assert all(len(prompts) == PAIRS for prompts in round_prompts(run_dir))
    steps = [[h["timesteps"] for h in r["history"]] for r in resumed["rounds"][1:]]
    assert steps == [[h["timesteps"] for h in r["history"]] for r in straight["rounds"][1:]]
    assert [r["refit"]["n_pairs"] for r in resumed["rounds"][1:]] == [12 + PAIRS, 12 + 2 * PAIRS]
    with pytest.raises(ValueError, match="already finished"):
        rlhf(resume=run_dir)


def test_resume_with_more_rounds_extends_a_finished_loop(
    straight: dict[str, Any], tiny_model: Path, round0_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`textgen rlhf --resume RUN --rounds 2` runs a finished 1-round loop on to the 2-round loop it would have been:
    the same prompts, steps and refits; the 1-round report is kept beside."""
    rlhf(loop_config(tiny_model, round0_rm, tmp_path, rounds=1), verbose=0)
    (run_dir,) = tmp_path.iterdir()
    one = json.loads((run_dir / "report.json").read_text())
    code, _, err = _cli(["rlhf", "--resume", str(run_dir), "--rounds", "1"], "", monkeypatch)
    assert code == 1 and "--rounds 1 does not extend" in err
    code, _, err = _cli(["rlhf", "--resume", str(run_dir), "--rounds", "2"], "", monkeypatch)
    assert code == 0, err
    extended = json.loads((run_dir / "report.json").read_text())
    assert json.loads((run_dir / "report.1-rounds.json").read_text()) == one
    assert [r["round"] for r in extended["rounds"]] == [0, 1, 2] and extended["config"]["rounds"] == 2
    assert round_prompts(run_dir) == round_prompts(Path(straight["run_dir"]))
    steps = [[h["timesteps"] for h in r["history"]] for r in extended["rounds"][1:]]
    assert steps == [[h["timesteps"] for h in r["history"]] for r in straight["rounds"][1:]]
    assert [r["refit"]["n_pairs"] for r in extended["rounds"][1:]] == [12 + PAIRS, 12 + 2 * PAIRS]


def _cli(argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """``textgen ARGV`` here with ``stdin`` as the keyboard: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_human_annotator_labels_a_round_from_stdin(
    tiny_model: Path, round0_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers come one line each; input that ends mid-round stops with every label saved, --resume asks on."""
    argv = ["rlhf", "--model", str(tiny_model), "--reward-model", str(round0_rm), *TINY_ARGS, "--out", str(tmp_path),
            "--rounds", "1", "--tokens-per-round", "8", "--pairs-per-round", "4", "--annotator", "human"]  # fmt: skip
    code, out, err = _cli(argv, "1\n", monkeypatch)  # one answer, then the input ends
    (run_dir,) = tmp_path.iterdir()
    assert code == 130 and f"textgen rlhf --resume {run_dir}" in err
    assert json.loads((run_dir / "config.json").read_text())["train"]["beta"] == LOOP_BETA  # the loop's own default
    first = load_preferences(run_dir / "round-1" / "pairs.jsonl")
    assert len(first) == 1 and f"[1] {first[0].chosen}\n" in out  # answered 1: the first shown is chosen

    code, out, err = _cli(["rlhf", "--resume", str(run_dir)], "2\nmaybe\ns\n1\n", monkeypatch)
    assert code == 0, err
    assert out.count("Which is better?") == 4 and "please answer 1, 2 or s" in out  # 3 pairs asked, 1 re-asked
    pairs = load_preferences(run_dir / "round-1" / "pairs.jsonl")
    assert len(pairs) == 3 and pairs[0] == first[0]  # 1 + 2 answered, 1 skipped; nothing asked twice
    assert f"[2] {pairs[1].chosen}\n" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rounds"][1]["refit"]["n_pairs"] == 12 + 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--rounds", "0"], "rounds must be at least 1"),
     (["--algo", "maskable_ppo"], "choose one of ppo, a2c, trpo"),
     (["--annotator-beta", "-1"], "annotator_beta must be >= 0"),
     (["--reward-model", "gold", "--pairs-per-round", "2"], "a refit needs at least 4 pairs"),
     (["--reward-model", "gold", "--base-pairs", "missing.jsonl"], "missing.jsonl"),
     (["--resume", "nowhere"], "nowhere is not a textgen rlhf run directory"),
     (["--resume", "nowhere", "--rounds", "3", "--beta", "0.1"], "but --rounds, which extends the run; drop --beta")],
)  # fmt: skip
def test_bad_options_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = [] if "--resume" in argv else ["--out", str(tmp_path / "runs")]
    code, _, err = _cli(["rlhf", *argv, *out], "", monkeypatch)
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing made


def test_unknown_options_are_usage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = _cli(["rlhf", "--total-timesteps", "64"], "", monkeypatch)  # each round has --tokens-per-round
    assert code == 2 and "unrecognized arguments: --total-timesteps" in err
    code, _, err = _cli(["rlhf", "--annotator", "robot"], "", monkeypatch)
    assert code == 2 and "invalid choice: 'robot'" in err


def test_resume_of_a_train_run_says_which_command(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"task": "positive-review"}))
    with pytest.raises(ValueError, match="textgen train --resume"):
        rlhf(resume=tmp_path)


def test_help_lists_the_train_options_and_the_loops(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["rlhf", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and text.startswith("usage: textgen rlhf")
    for option in ("--model", "--reward-model", "--beta", "--lora-r", "--seed", "--out", "--rounds",
                   "--tokens-per-round", "--pairs-per-round", "--annotator {simulated,human}", "--base-pairs",
                   "--resume"):  # fmt: skip
        assert option in text, option
    assert "--total-timesteps" not in text
    assert re.search(rf"--beta BETA\s+KL coefficient [^\n]*\n\s*\(default: {LOOP_BETA}\)", text)  # the loop's β
