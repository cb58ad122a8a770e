"""The examples/ scripts run end to end on the tiny LM at tiny budgets (what a user copies must work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest, and CI has two cores


def run_example(name: str, args: str, cwd: Path) -> str:
    command = [sys.executable, str(ROOT / "examples" / name), *args.split()]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_ppo_then_generate(tiny_model: Path, tmp_path: Path) -> None:
    lengths = "--max-new-tokens 6 --max-prompt-tokens 128 --reward-model gold"
    out = run_example(
        "train_ppo.py",
        f"--model {tiny_model} --n-envs 2 --timesteps 64 --eval-prompts 2 --save agent {lengths}",
        tmp_path,
    )
    assert "gold_score" in out and "after:" in out and (tmp_path / "agent.zip").is_file()
    out = run_example(
        "generate_with_saved_agent.py", f"agent.zip the_movie_was a_dull_film --export lm {lengths}", tmp_path
    )
    assert out.count("reward model") == 2 and out.splitlines()[-1].startswith("the_movie_was")
    assert (tmp_path / "lm" / "config.json").is_file()


def test_compare_two_algorithms(tiny_model: Path, tmp_path: Path) -> None:
    args = f"--model {tiny_model} --n-envs 2 --max-new-tokens 6 --max-prompt-tokens 128 --reward-model gold"
    out = run_example(
        "compare_two_algorithms.py", f"{args} --algos a2c maskable_ppo --timesteps 32 --eval-prompts 2", tmp_path
    )
    rows = [line.split() for line in out.splitlines()[-2:]]
    assert [r[0] for r in rows] == ["a2c", "maskable_ppo"] and all(len(r) == 5 for r in rows)


def test_reward_model_then_ppo(tiny_model: Path, tmp_path: Path) -> None:
    args = f"--model {tiny_model} --n-envs 2 --max-new-tokens 6 --max-prompt-tokens 128"
    out = run_example("reward_model_then_ppo.py", f"{args} --pairs 16 --timesteps 32 --out run", tmp_path)
    assert "reward model: held-out accuracy" in out and "gold_score" in out
    assert len((tmp_path / "run" / "prefs.jsonl").read_text().splitlines()) == 16
    assert (tmp_path / "run" / "reward_model" / "head.safetensors").is_file()
    assert (tmp_path / "run" / "ppo.zip").is_file()


def test_rlhf_loop(tiny_model: Path, tmp_path: Path) -> None:
    args = f"--model {tiny_model} --n-envs 2 --max-new-tokens 4 --max-prompt-tokens 128 --eval-prompts 2"
    budget = "--reward-model gold --rounds 2 --tokens-per-round 64 --pairs-per-round 4 --out runs"
    out = run_example("rlhf_loop.py", f"{args} {budget}", tmp_path)
    rows = [line.split() for line in out.splitlines()[-3:]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and len(rows[0]) == 4 and len(rows[2]) == 5
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "report.json").is_file() and (run_dir / "round-2" / "reward_model" / "head.safetensors").is_file()
