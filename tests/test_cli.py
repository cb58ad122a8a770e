"""The ``textgen`` command line: help texts, and the RLHF loop end to end on the tiny model
(preferences -> train-rm -> rollout, train -> export)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PROMPTS
from helpers import interrupt_textgen

from agents.cli import build_parser, main
from text_env import tasks
from text_env.rewards.gold import VaderSentiment
from text_env.rewards.preferences import load_preferences
from text_env.rewards.reward_model import RewardModel
from text_env.tasks import Task, register_task

KEY_OPTIONS = {
    "train": ["--task", "--model", "--algo", "--reward-model", "--total-timesteps", "--n-envs", "--beta", "--lora-r",
              "--no-bf16", "--out"],
    "rollout": ["--model", "--task", "--reward-model", "--episodes", "--seed"],
    "preferences": ["--task", "--model", "--pairs", "--out", "--annotator", "--beta", "--batch-size"],
    "train-rm": ["--data", "--out", "--backbone", "--mode", "--pooling", "--epochs", "--learning-rate"],
    "export": ["model_zip", "out", "--algo"],
}  # fmt: skip


def run(argv: list[str]) -> str:
    """``textgen ARGV`` in this process; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


# --- help ------------------------------------------------------------------------------------------------------


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: textgen")
    for command in KEY_OPTIONS:
        assert command in text


@pytest.mark.parametrize("command", sorted(KEY_OPTIONS))
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: textgen {command}")
    for option in KEY_OPTIONS[command]:
        assert re.search(rf"(^|\s){re.escape(option)}\b", text), f"{command} --help does not mention {option}"


@pytest.mark.parametrize("command", ["train", "rlhf", "sft"])
def test_bool_options_take_both_forms_whatever_the_default(command: str) -> None:
    """``--bf16`` and ``--no-bf16`` both parse on every machine (bf16's default depends on the CPU), and an unset
    option stays unset, so the config's own default applies."""
    parser = build_parser()
    for argv, expected in ((["--bf16"], True), (["--no-bf16"], False), ([], None)):
        assert parser.parse_args([command, *argv]).bf16 is expected


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["train-rm", "--out", "x"], ["train-rm", "--data", "d", "--out", "x", "--mode", "bogus"],
     ["preferences"], ["train", "--algo", "sac"], ["export", "model.zip"],
     ["train-rm", "--data", "d", "--out", "x", "--layer", "0,1"],
     ["train-rm", "--data", "d", "--out", "x", "--layer", "a"]],
)  # fmt: skip
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_tasks_lists_every_task_with_its_data_splits_and_gold(capsys: pytest.CaptureFixture[str]) -> None:
    from text_env.rewards import scorer_name
    from text_env.tasks import get_task, list_tasks

    main(["tasks"])
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in capsys.readouterr().out.splitlines()}
    for name in list_tasks():
        task = get_task(name)
        assert task.description.startswith(f"{name}: ")
        assert f"| {len(task.train_prompts)} / {len(task.eval_prompts)} | {scorer_name(task.gold)} |" in rows[name]
        assert rows[name].endswith(f" | {task.recommended or 'not measured'} |")


def test_tasks_measure_adds_the_base_models_gold(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--measure N``: each row gains the untrained model's gold on the task's first N eval prompts, the figure
    ``evaluate_base_model`` (what ``benchmarks/tasks.py`` reports) gives."""
    from agents.evaluate import evaluate_base_model

    for name in set(tasks.list_tasks()) - {"positive-review", "dialogue"}:  # the others' prompts take minutes here
        del tasks._REGISTRY[name]
    room = {"max_prompt_tokens": 200, "max_new_tokens": 4}  # the tiny tokenizer splits finer than SmolLM2's
    main(["tasks", "--measure", "2", "--model", str(tiny_model), "--max-prompt-tokens", "200", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert "base model's gold (2 eval prompts) |" in out.splitlines()[0]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in out.splitlines()}
    for name in ("positive-review", "dialogue"):
        gold = evaluate_base_model(name, str(tiny_model), 2, **room).gold_score
        assert len(gold) == 2 and rows[name].endswith(f"| {gold.mean():+.3f} ± {gold.std():.3f} |")


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_tasks_measure_needs_a_prompt_count(capsys: pytest.CaptureFixture[str], value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["tasks", "--measure", value])
    assert exit_.value.code == 2
    assert f"argument --measure: {value!r} is not a number of prompts (a whole number >= 1)" in capsys.readouterr().err


def test_console_script_help() -> None:
    textgen = shutil.which("textgen")
    assert textgen, "the textgen console script is not installed (pip install -e .)"
    result = subprocess.run([textgen, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: textgen" in result.stdout and "train-rm" in result.stdout


# --- end to end on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may touch the user's model cache or leak tasks into other tests."""
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))


@pytest.fixture(scope="module")
def rlhf_data(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``textgen preferences`` then ``textgen train-rm`` (run once for the module)."""
    work = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEXTGEN_CACHE", str(work / "cache"))
        prefs_out = run(["preferences", "--model", str(tiny_model), "--pairs", "8", "--out", str(work / "p.jsonl"),
                         "--batch-size", "4", "--max-new-tokens", "4"])  # fmt: skip
        rm_out = run(["train-rm", "--data", str(work / "p.jsonl"), "--out", str(work / "rm"), "--backbone",
                      str(tiny_model), "--epochs", "2", "--layer", "1,2"])  # fmt: skip
    return {"dir": work, "preferences": prefs_out, "train-rm": rm_out}


def test_preferences_and_train_rm(tiny_model: Path, rlhf_data: dict) -> None:
    work = rlhf_data["dir"]
    pairs = load_preferences(work / "p.jsonl")
    assert len(pairs) == 8 and len((work / "p.jsonl").read_text(encoding="utf-8").splitlines()) == 8
    positive_review = tasks.get_task("positive-review")
    assert all(p.prompt in positive_review.train_prompts for p in pairs)
    assert f"8 preference pairs in {work / 'p.jsonl'}" in rlhf_data["preferences"]

    rm = work / "rm"
    assert {"reward_model.json", "head.safetensors", "report.json"} <= {p.name for p in rm.iterdir()}
    assert json.loads((rm / "reward_model.json").read_text())["layer"] == [1, 2]  # --layer 1,2: side by side
    assert (
        "test split (2 pairs, never used to fit or choose)" in rlhf_data["train-rm"]
        and f"Saved to {rm}" in rlhf_data["train-rm"]
    )

    def no_nan(constant: str) -> None:
        raise AssertionError(f"report.json holds {constant}, which is not JSON")

    report = json.loads((rm / "report.json").read_text(), parse_constant=no_nan)
    assert (report["n_train"], report["n_validation"], report["n_heldout"]) == (5, 1, 2)
    assert report["split"] == {"validation": 0.1, "test": 0.2, "seed": 0}
    assert 0.0 <= report["accuracy"] <= 1.0
    model = RewardModel.load(rm)
    assert model.config.mode == "head" and model.config.backbone == str(tiny_model)
    scores = model.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    assert scores.shape == (8,) and np.all(np.isfinite(scores))


def test_rollout_positive_review_on_tiny_model(
    tiny_model: Path, rlhf_data: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    # positive-review openings are up to 89 tokens with the tiny tokenizer: more than the task's 72
    rm = rlhf_data["dir"] / "rm"
    argv = ["rollout", "--model", str(tiny_model), "--reward-model", str(rm), "--episodes", "1"]
    with pytest.raises(SystemExit):
        run(argv)
    assert "Raise max_prompt_tokens" in capsys.readouterr().err
    text = run([*argv, "--max-prompt-tokens", "128"])
    assert "prompt:" in text and "reward" in text


@pytest.fixture
def tiny_task() -> str:
    """A task whose prompts fit the tiny tokenizer (registered for one test by the autouse isolation)."""

    def make() -> Task:
        return Task(
            "tiny-review", TINY_PROMPTS, TINY_PROMPTS[:2], VaderSentiment, max_new_tokens=4, max_prompt_tokens=24
        )

    register_task("tiny-review", make)
    return "tiny-review"


@pytest.mark.parametrize("task_name", [t for t in tasks.list_tasks() if t != "positive-review"])
def test_every_task_gets_a_learned_reward_model_from_the_commands(
    tiny_model: Path, tmp_path: Path, task_name: str
) -> None:
    """`textgen preferences --task X` then `textgen train-rm --task X` make a reward model of any task (labels from
    its gold, references included), which then scores the task's texts."""
    data, rm = tmp_path / "p.jsonl", tmp_path / "rm"
    run(["preferences", "--task", task_name, "--model", str(tiny_model), "--pairs", "10", "--out", str(data),
         "--batch-size", "10", "--max-new-tokens", "4"])  # fmt: skip
    pairs = load_preferences(data)
    task = tasks.get_task(task_name)
    assert len(pairs) == 10 and {p.prompt for p in pairs} <= set(task.train_prompts)
    records = {e.prompt: e for e in task.examples("train")}
    assert all(p.references == records[p.prompt].references for p in pairs)
    run(["train-rm", "--data", str(data), "--out", str(rm), "--backbone", str(tiny_model), "--task", task_name])
    scores = RewardModel.load(rm).score([p.prompt for p in pairs], [p.chosen for p in pairs])
    assert scores.shape == (10,) and np.isfinite(scores).all()
    report = json.loads((rm / "report.json").read_text())
    assert report["n_train"] + report["n_validation"] + report["n_heldout"] == 10


def test_rollout_with_reward_model(tiny_model: Path, rlhf_data: dict, tiny_task: str) -> None:
    rm = rlhf_data["dir"] / "rm"
    argv = ["rollout", "--model", str(tiny_model), "--task", tiny_task, "--reward-model", str(rm), "--episodes", "2"]
    text = run(argv)
    assert text.count("prompt:") == 2 and text.count("completion:") == 2
    assert len(re.findall(r"reward \(reward model\): [+-]\d+\.\d{3}\s+gold score: [+-]\d+\.\d{3}", text)) == 2
    shown = re.findall(r"prompt:\s+(.*)", text)
    assert all(p in TINY_PROMPTS for p in shown)


TRAIN_ARGS = ["--reward-model", "gold", "--total-timesteps", "64", "--n-envs", "2", "--n-steps", "16", "--batch-size",
              "16", "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "4"]  # fmt: skip


def test_train_positive_review_on_tiny_model(tiny_model: Path, tmp_path: Path) -> None:
    text = run(["train", "--model", str(tiny_model), *TRAIN_ARGS, "--max-prompt-tokens", "128", "--out", str(tmp_path)])
    assert "| gold_score |" in text and len(list(tmp_path.glob("positive-review-ppo-*/model.zip"))) == 1


def test_train_then_export(tiny_model: Path, tmp_path: Path, tiny_task: str) -> None:
    from stable_baselines3 import PPO
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = run(["train", "--model", str(tiny_model), "--task", tiny_task, *TRAIN_ARGS, "--out", str(tmp_path / "runs")])
    assert "| metric | before | after |" in text and "| prompt | before | after |" in text
    for metric in ("reward_model_score", "gold_score", "kl", "distinct_1", "distinct_2"):
        assert re.search(rf"\| {metric} \| -?\d+\.\d{{3}} \| -?\d+\.\d{{3}} \|", text), metric
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{tiny_task}-ppo-")
    assert {"model.zip", "report.json", "report.md"} <= {p.name for p in run_dir.iterdir()}
    assert f"saved to {run_dir}" in text
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["algo"] == "ppo" and report["config"]["total_timesteps"] == 64
    assert set(report["before"]) >= {"reward_model_score", "gold_score", "kl"} and len(report["samples"]) == 2
    assert (run_dir / "report.md").read_text().startswith("| metric | before | after |")

    exported = tmp_path / "exported"
    assert f"exported to {exported}" in run(["export", str(run_dir / "model.zip"), str(exported)])
    lm = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer("the movie was")["input_ids"]
    policy_lm = PPO.load(run_dir / "model.zip", device="cpu").policy.lm
    ids = torch.tensor([tokenizer("the movie was")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, policy_lm(ids).logits)  # the policy's LM, as transformers sees it


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "a2c", "trpo", "maskable_ppo", "ppo_bag_of_tokens", "recurrent_ppo_lstm"])
def test_every_algo_trains_and_evaluates_through_the_cli(
    tiny_model: Path, tmp_path: Path, tiny_task: str, algo: str
) -> None:
    """Each --algo from its preset (TRPO: no LoRA, top blocks) through before/after evaluation (masks for NLPO)."""
    args = [*TRAIN_ARGS, "--total-timesteps", "32", "--algo", algo, "--out", str(tmp_path)]
    text = run(["train", "--model", str(tiny_model), "--task", tiny_task, *args])
    assert "| gold_score |" in text
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    expected = {"trpo": (0, 2), "ppo_bag_of_tokens": (0, None), "recurrent_ppo_lstm": (0, None)}.get(algo, (16, None))
    assert config["algo"] == algo and (config["lora_r"], config["train_layers"]) == expected


def test_resume_refuses_other_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--resume", str(tmp_path), "--beta", "0.1"])
    assert exit_.value.code == 1
    assert "--resume takes every setting from" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["train", "--n-envs", "0"], "n_envs must be at least 1"),
     (["train", "--resume", "nowhere"], "nowhere is not a textgen train run directory"),
     (["train-rm", "--data", "missing.jsonl", "--out", "x"], "missing.jsonl")],
)  # fmt: skip
def test_user_errors_are_one_line_and_debug_shows_the_traceback(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match=re.escape(message)):
        main(["--debug", *argv])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"textgen {version('textgen-rl')}"


@pytest.mark.slow
def test_interrupted_train_resumes_to_the_same_run(tiny_model: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) saves a checkpoint and exits 130; --resume finishes the same number of steps with the
    same report keys as an uninterrupted run, and its history continues the interrupted one."""
    args = ["--model", str(tiny_model), *TRAIN_ARGS, "--total-timesteps", "320", "--max-prompt-tokens", "128",
            "--checkpoint-every", "1"]  # fmt: skip
    interrupted = tmp_path / "interrupted"
    code, err = interrupt_textgen(["train", *args, "--out", str(interrupted)], interrupted, "*/checkpoint/state.json")
    assert code == 130, err[-2000:]
    (run_dir,) = (tmp_path / "interrupted").iterdir()
    assert f"textgen train --resume {run_dir}" in err
    checkpoint = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert 0 < checkpoint["num_timesteps"] < 320 and not (run_dir / "report.json").exists()
    assert checkpoint["reward_scale"]["scale"] > 0  # the gold reward is scaled: the measured divisor travels too

    run(["train", "--resume", str(run_dir)])
    resumed = json.loads((run_dir / "report.json").read_text())
    run(["train", *args, "--out", str(tmp_path / "straight")])
    (straight_dir,) = (tmp_path / "straight").iterdir()
    straight = json.loads((straight_dir / "report.json").read_text())

    assert set(resumed) == set(straight) and resumed["resumed"] and not straight["resumed"]
    steps = [h["timesteps"] for h in resumed["history"]]
    assert steps == [h["timesteps"] for h in straight["history"]] == [32.0 * (k + 1) for k in range(10)]
    assert resumed["history"][: len(checkpoint["history"])] == checkpoint["history"]
    assert resumed["before"] == json.loads((run_dir / "before.json").read_text())["summary"]
    assert (run_dir / "model.zip").is_file() and not (run_dir / "checkpoint" / "model.zip").exists()  # one copy
    with pytest.raises(SystemExit):  # a finished run is not resumed again (unless extended)
        main(["train", "--resume", str(run_dir)])


def test_resume_with_more_timesteps_extends_a_finished_run(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`textgen train --resume RUN --total-timesteps N` trains a finished run on to N, as SB3's
    `learn(..., reset_num_timesteps=False)` would: the history goes on, β and the reward scale are the run's, the report
    covers the whole run, and the earlier report is kept under its step count."""
    from stable_baselines3 import PPO

    args = ["--model", str(tiny_model), *TRAIN_ARGS, "--max-prompt-tokens", "128"]  # 2 rollouts of 32 steps
    run(["train", *args, "--out", str(tmp_path)])
    (run_dir,) = tmp_path.iterdir()
    first = json.loads((run_dir / "report.json").read_text())
    end_state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert end_state["num_timesteps"] == 64 and end_state["reward_scale"]["scale"] > 0
    for argv, message in [(["--total-timesteps", "64"], "--total-timesteps 64 does not extend"),
                          (["--total-timesteps", "128", "--beta", "0.2"], "drop --beta")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--resume", str(run_dir), *argv])
        assert exit_.value.code == 1 and message in capsys.readouterr().err
    assert (run_dir / "report.json").is_file()  # a refused extension changes nothing

    run(["train", "--resume", str(run_dir), "--total-timesteps", "128"])
    extended = json.loads((run_dir / "report.json").read_text())
    assert (
        extended["config"]["total_timesteps"]
        == 128
        == json.loads((run_dir / "config.json").read_text())["total_timesteps"]
    )
    assert [h["timesteps"] for h in extended["history"]] == [32.0, 64.0, 96.0, 128.0]
    assert extended["history"][:2] == first["history"] and extended["before"] == first["before"]
    assert json.loads((run_dir / "report.64-total-timesteps.json").read_text()) == first
    assert (run_dir / "report.64-total-timesteps.md").is_file()
    assert PPO.load(run_dir / "model.zip", device="cpu").num_timesteps == 128
    with pytest.raises(SystemExit):  # finished again
        main(["train", "--resume", str(run_dir)])
