"""The translation task on one's own parallel data: records from a JSONL file or an hf: dataset directory, chrF gold
against the reference translations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

from text_env import tasks
from text_env.env import TextGenEnv
from text_env.rewards.gold import ChrF
from text_env.tasks import get_task, list_tasks, register_task
from text_env.tasks.translation import make_task, request, translation_examples

pytest.importorskip("sacrebleu")

PAIRS = [
    ("The cat is sleeping on the sofa.", "Le chat dort sur le canapé."),
    ("I would like a cup of coffee, please.", "Je voudrais une tasse de café, s'il vous plaît."),
    ("The train leaves at eight o'clock.", "Le train part à huit heures."),
    ("We are going to the beach tomorrow.", "Nous allons à la plage demain."),
    ("My sister reads a book every week.", "Ma sœur lit un livre chaque semaine."),
    ("It is raining in Paris today.", "Il pleut à Paris aujourd'hui."),
]


def write_pairs(path: Path, pairs: list[tuple[str, str | list[str]]]) -> Path:
    path.write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs), encoding="utf-8")
    return path


@pytest.fixture
def en_fr(tmp_path: Path) -> tuple[Path, Path]:
    """Four training pairs and two held-out ones (the second with two valid translations)."""
    held_out: list[tuple[str, str | list[str]]] = [
        PAIRS[4],
        (PAIRS[5][0], [PAIRS[5][1], "Aujourd'hui, il pleut à Paris."]),
    ]
    return write_pairs(tmp_path / "train.jsonl", list(PAIRS[:4])), write_pairs(tmp_path / "eval.jsonl", held_out)


def test_records_carry_the_translations(en_fr: tuple[Path, Path]) -> None:
    task = make_task(*en_fr, "English", "French")
    train, held_out = task.examples("train"), task.examples("eval")
    assert (len(train), len(held_out)) == (4, 2) and task.name == "translation"
    assert train[0].prompt == "Translate from English to French:\nThe cat is sleeping on the sofa."
    assert train[0].prompt == request(PAIRS[0][0], "English", "French")
    assert train[0].references == ("Le chat dort sur le canapé.",) and train[0].meta == {"source": PAIRS[0][0]}
    assert held_out[1].references == (PAIRS[5][1], "Aujourd'hui, il pleut à Paris.")  # several valid translations
    assert isinstance(task.gold, ChrF) and task.instruction is None and task.stop_strings == ("\n",)
    assert task.description.startswith("translation: ")
    assert "translation" not in list_tasks()  # it needs the user's data: nothing to register by default


def test_chrf_gold_scores_translations(en_fr: tuple[Path, Path]) -> None:
    task = make_task(*en_fr, "English", "French")
    examples = task.examples("train")
    prompts = [e.prompt for e in examples]
    columns = {"references": [list(e.references) for e in examples]}
    perfect = task.gold.score(prompts, [e.references[0] for e in examples], **columns)
    assert perfect == pytest.approx([1.0] * 4)
    wrong = task.gold.score(prompts, [examples[(i + 2) % 4].references[0] for i in range(4)], **columns)
    assert wrong.max() < 0.3  # another sentence's translation
    copied = task.gold.score(prompts, [e.meta["source"] for e in examples], **columns)
    assert copied.max() < 0.0  # an echo of the source sentence loses the echo penalty
    close = task.gold.score(prompts[:1], ["Le chat dort sur le sofa."], references=columns["references"][:1])
    assert 0.5 < close[0] < 1.0  # partial credit for a near miss


def test_hf_dataset_directory_and_bad_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "pairs"
    data.mkdir()
    write_pairs(data / "data.jsonl", list(PAIRS))
    examples = translation_examples(f"hf:{data}", "English", "French")
    assert [e.references for e in examples] == [(t,) for _, t in PAIRS]
    assert examples[2].prompt == request(PAIRS[2][0], "English", "French")
    with pytest.raises(ValueError, match="no reference field 'french'"):
        translation_examples(data / "data.jsonl", "English", "French", reference_column="french")
    with pytest.raises(ValueError, match="has no translation"):
        translation_examples(write_pairs(tmp_path / "blank.jsonl", [("Hello.", " ")]), "English", "French")
    with pytest.raises(ValueError, match="plain text"):
        (tmp_path / "pairs.txt").write_text("Hello.\n", encoding="utf-8")
        translation_examples(tmp_path / "pairs.txt", "English", "French")
    with pytest.raises(ValueError, match="give both"):
        make_task(data / "data.jsonl", data / "data.jsonl", "English", " ")


def test_registered_task_runs_in_the_env(
    en_fr: tuple[Path, Path], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registered under a name of one's choosing, the task is an env like any other: the checker passes and an
    episode's gold is chrF against the record's references."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the registration ends with the test
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))
    register_task("test-en-fr", lambda: make_task(*en_fr, "English", "French", name="test-en-fr"))
    task = get_task("test-en-fr")
    assert task.description.startswith("test-en-fr: ")
    env = TextGenEnv(model=str(tiny_model), task="test-en-fr", split="eval", reward_model="gold", max_new_tokens=4)
    gym_check_env(env, skip_render_check=True)
    _, info = env.reset(seed=0)
    example = next(e for e in task.examples("eval") if e.prompt == info["prompt"])
    assert info["references"] == example.references and info["meta"] == example.meta
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    expected = task.gold.score([example.prompt], [info["completion"]], references=[list(example.references)])
    assert reward == info["gold_score"] == pytest.approx(float(expected[0]))
    assert np.isfinite(reward) and -1.0 <= reward <= 1.0


def test_own_task_module_trains_from_the_command_line(
    en_fr: tuple[Path, Path], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--task module:name`` imports one's module, which registers the task on one's data (gymnasium's
    ``module:Env-v0``): translation reaches ``textgen train`` without being a built-in task."""
    from agents.cli import main

    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))
    module = "my_en_fr_tasks"
    (tmp_path / f"{module}.py").write_text(
        "from text_env.tasks import register_task\nfrom text_env.tasks.translation import make_task\n"
        f"register_task('en-fr', lambda: make_task({str(en_fr[0])!r}, {str(en_fr[1])!r}, 'English', 'French', "
        "name='en-fr'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    args = ["--model", str(tiny_model), "--reward-model", "gold", "--total-timesteps", "16", "--n-envs", "2",
            "--n-steps", "8", "--batch-size", "8", "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16",
            "--max-new-tokens", "4", "--out", str(tmp_path / "runs")]  # fmt: skip
    main(["train", "--task", f"{module}:en-fr", *args])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith(f"{module}_en-fr-ppo-")  # no ':' in a file name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["config"]["task"] == f"{module}:en-fr" and "gold_score" in report["after"]
    assert "en-fr" in list_tasks() and f"{module}:en-fr" not in list_tasks()
    with pytest.raises(ValueError, match=rf"task '{module}:nope': importing '{module}' registered no task 'nope'"):
        get_task(f"{module}:nope")
    with pytest.raises(ValueError, match=r"task 'no_such_module_xyz:en-fr': cannot import 'no_such_module_xyz'"):
        get_task("no_such_module_xyz:en-fr")
