"""The recorded check of each shipped reward model (``text_env/rewards/pretrained/<task>``), in seconds, not minutes.

Re-running ``HOW_MADE.md``'s ``train-rm`` on all of a model's pairs takes 10 minutes (20,000 texts through 20 blocks
of SmolLM2), so the suite checks a fixed sample instead, against what this module recorded once:

- the backbone's features of :data:`SAMPLE_PAIRS` test pairs' texts, and the shipped model's scores of them: the
  features a user's machine computes are the ones the head was fitted on, and the head scores them as shipped;
- ``textgen train-rm`` with ``HOW_MADE.md``'s options on the first :data:`REFIT_PAIRS` shipped pairs: its test
  accuracy and its scores of the sample, so the fitting pipeline still makes the same kind of model. The default
  task's model only: the fitting code is every task's, and the refit is most of the check's time.

The whole refit stays one command (``HOW_MADE.md``). Record again after changing a shipped model::

    python tests/shipped_reward_models.py      # writes tests/data/shipped_reward_models/<task>.json/.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from text_env.core import DEFAULT_TASK
from text_env.rewards.preferences import load_preferences
from text_env.rewards.reward_model import RewardModel
from text_env.rewards.training import split_pairs
from text_env.tasks import get_task, list_tasks, shipped_reward_model

RECORDS = Path(__file__).parent / "data" / "shipped_reward_models"
SAMPLE_PAIRS = 8  # the first pairs of the shipped model's test split: 16 texts, ~1 s of features
REFIT_PAIRS = 256  # the first pairs of its prefs.jsonl, refitted with its own options: ~15 s on 2 cores


def shipped_tasks() -> list[str]:
    """Tasks that ship a reward model."""
    return [name for name in list_tasks() if shipped_reward_model(name)]


def shipped_dir(task: str) -> Path:
    return Path(get_task(task).reward_model)


def split(task: str) -> dict[str, Any]:
    """The split options the shipped model was fitted with (its report.json)."""
    return json.loads((shipped_dir(task) / "report.json").read_text())["split"]


def sample(task: str) -> tuple[list[str], list[str]]:
    """Prompts and texts of the sample: both completions of the first :data:`SAMPLE_PAIRS` test pairs."""
    _, _, test = split_pairs(load_preferences(shipped_dir(task) / "prefs.jsonl"), **split(task))
    pairs = test[:SAMPLE_PAIRS]
    return [p.prompt for p in pairs for _ in (0, 1)], [t for p in pairs for t in (p.chosen, p.rejected)]


def refit_data(task: str, path: Path) -> Path:
    """Write the first :data:`REFIT_PAIRS` lines of the shipped ``prefs.jsonl`` (every column kept) to ``path``."""
    with (shipped_dir(task) / "prefs.jsonl").open(encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(REFIT_PAIRS), f, strict=False)), encoding="utf-8")
    return path


def train_rm_argv(task: str, data: Path, out: Path) -> list[str]:
    """``textgen train-rm`` as ``HOW_MADE.md`` runs it (the shipped model's layers and split), on ``data``."""
    config = json.loads((shipped_dir(task) / "reward_model.json").read_text())
    layers = ",".join(map(str, np.atleast_1d(config["layer"] or 0)))  # e.g. 1,20
    s = split(task)
    return ["train-rm", "--data", str(data), "--out", str(out), "--layer", layers, "--task", task,
            "--validation", str(s["validation"]), "--test", str(s["test"]), "--seed", str(s["seed"])]  # fmt: skip


@torch.no_grad()
def features(model: RewardModel, prompts: list[str], texts: list[str]) -> torch.Tensor:
    return model.features(prompts, texts).float()


def load_record(task: str) -> tuple[dict[str, Any], torch.Tensor]:
    """The recorded figures and sample features of ``task``."""
    record = json.loads((RECORDS / f"{task}.json").read_text())
    return record, load_file(RECORDS / f"{task}.safetensors")["features"]


def record(task: str, work: Path) -> None:
    """Measure and write ``task``'s record (the features, the shipped scores; the default task's, the subset refit)."""
    from agents.cli import main

    prompts, texts = sample(task)
    shipped = RewardModel.load(shipped_dir(task))
    feats = features(shipped, prompts, texts)
    rec = {"task": task, "sample_pairs": SAMPLE_PAIRS, "shipped_scores": shipped.score(prompts, texts).tolist()}
    if task == DEFAULT_TASK:
        out = work / f"{task}-refit"
        main(train_rm_argv(task, refit_data(task, work / f"{task}.jsonl"), out))
        report = json.loads((out / "report.json").read_text())
        rec |= {
            "refit_pairs": REFIT_PAIRS,
            "refit_scores": RewardModel.load(out).score(prompts, texts).tolist(),
            "refit_report": {k: report[k] for k in ("n_heldout", "accuracy", "gold_accuracy", "weight_decay")},
        }
    rec["machine"] = _machine()
    RECORDS.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous()}, RECORDS / f"{task}.safetensors")
    (RECORDS / f"{task}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(
        f"{task}: recorded {len(texts)} texts"
        + (f", refit on {REFIT_PAIRS} pairs: {rec['refit_report']}" if "refit_report" in rec else "")
    )


def _machine() -> str:
    from agents.train import cpu_kind

    return f"{cpu_kind()}, torch {torch.__version__}"


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        for name in shipped_tasks():
            record(name, Path(tmp))
