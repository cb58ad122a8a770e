"""textgen train --engine rllib on a Ray cluster of two nodes on this machine, started as Ray's own tests start one
(``ray.cluster_utils.Cluster``): the head node has no CPU slot, so the EnvRunners run on the other node, and the run
reaches it through ``RAY_ADDRESS`` as a user's would."""

from __future__ import annotations

import json
from pathlib import Path

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
