"""textgen train --engine rllib beyond one process: on a Ray cluster of two nodes on this machine, started as Ray's
own tests start one (``ray.cluster_utils.Cluster``; the head node has no CPU slot, so the EnvRunners run on the other
node, and the run reaches it through ``RAY_ADDRESS`` as a user's would), and through the loss of an EnvRunner or of
the driver."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from agents.cli import main  # noqa: E402


def test_textgen_train_runs_on_a_two_node_cluster(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)  # the only CPU slots: every EnvRunner (1 CPU each) lands here
    cluster.wait_for_nodes()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    try:
        args = ["train", "--engine", "rllib", "--num-env-runners", "2", "--model", str(tiny_model), "--reward-model",
                "gold", "--total-timesteps", "32", "--n-envs", "2", "--n-steps", "8", "--batch-size", "8",
                "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "8",
                "--max-prompt-tokens", "128", "--lora-r", "4", "--out", str(tmp_path / "runs")]  # fmt: skip
        main(args)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    (report_file,) = (tmp_path / "runs").glob("*/report.json")
    report = json.loads(report_file.read_text())
    assert report["tokens"] >= 32 and len(report["history"]) >= 2
    assert report["nodes"]["env_runners"] == [worker.node_id] * 2  # both EnvRunners on the non-head node

    from transformers import pipeline

    exported = tmp_path / "exported"
    main(["export", report["checkpoint"], str(exported)])
    generate = pipeline("text-generation", model=str(exported))
    assert isinstance(generate("the movie was", max_new_tokens=4)[0]["generated_text"], str)


TINY_RUN = ["--reward-model", "gold", "--n-envs", "2", "--n-steps", "8", "--batch-size", "8", "--n-epochs", "1",
            "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "8", "--max-prompt-tokens", "128", "--lora-r", "4",
            "--checkpoint-every", "1"]  # fmt: skip


def _start(args: list[str], out: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "agents.cli", "train", "--engine", "rllib", *args, "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(child: subprocess.Popen[str], text: str, log: list[str]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        log.append(line)
        if text in line:
            return
    raise AssertionError(f"the run ended before printing {text!r}:\n{''.join(log[-40:])}")


def _env_runner_processes(parent: int) -> list[psutil.Process]:
    """The EnvRunner actors' processes of the Ray that the run ``parent`` started (Ray titles them by class)."""
    children = psutil.Process(parent).children(recursive=True)
    return [p for p in children if "SingleAgentEnvRunner" in " ".join(p.cmdline())]


def test_a_killed_env_runner_is_restarted_and_counted(tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL one of two EnvRunners after the first iteration: RLlib takes it out of service and samples on with the
    other while Ray restarts it, the run trains to its budget, and the report counts the loss and the episodes it
    may have cost."""
    child = _start(["--model", str(tiny_model), *TINY_RUN, "--num-env-runners", "2", "--total-timesteps", "96"],
                   tmp_path / "runs")  # fmt: skip
    log: list[str] = []
    try:
        _wait_for(child, "iteration 1:", log)
        (victim, *_) = _env_runner_processes(child.pid)
        victim.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=600)
    finally:
        child.kill()
    assert child.returncode == 0, "".join(log) + rest
    (report_file,) = (tmp_path / "runs").glob("*/report.json")
    report = json.loads(report_file.read_text())
    faults = report["faults"]
    assert report["tokens"] >= 96 and faults["env_runners_lost"] == 1, faults  # Ray restarts it in the background
    assert faults["episodes_lost_at_most"] == 1  # one env per EnvRunner


def test_a_killed_driver_resumes_from_the_last_checkpoint(tiny_model: Path, tmp_path: Path) -> None:
    """SIGKILL the driver after its second checkpoint; --resume continues from it to the budget, its history
    continuing the checkpoint's."""
    child = _start(["--model", str(tiny_model), *TINY_RUN, "--num-env-runners", "1", "--total-timesteps", "80"],
                   tmp_path / "runs")  # fmt: skip
    log: list[str] = []
    try:
        _wait_for(child, "iteration 2:", log)
        (run_dir,) = (tmp_path / "runs").iterdir()
        state_file = run_dir / "checkpoint" / "textgen_state.json"
        deadline = time.time() + 120
        while not (state_file.is_file() and len(json.loads(state_file.read_text())["history"]) >= 2):
            assert time.time() < deadline, "no second checkpoint"
            time.sleep(0.2)
        for process in [*psutil.Process(child.pid).children(recursive=True), psutil.Process(child.pid)]:
            process.send_signal(signal.SIGKILL)  # the driver and the Ray it started: the machine is lost
        child.wait(timeout=60)
    finally:
        child.kill()
    saved = json.loads(state_file.read_text())
    assert not (run_dir / "report.json").exists() and saved["sampled"] < 80
    main(["train", "--engine", "rllib", "--resume", str(run_dir)])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["resumed"] and report["tokens"] >= 80
    assert report["history"][: len(saved["history"])] == saved["history"]
    assert [h["timesteps"] for h in report["history"]] == [16.0 * (k + 1) for k in range(len(report["history"]))]
