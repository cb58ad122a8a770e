"""`textgen evaluate`: models side by side on the same prompts (tiny models), the bootstrap and Wilson intervals by
hand, one-line errors before any model loads, and the blind A/B page driven in Debian's chromium."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from browser import TIMEOUT, chromium, wait_for
from conftest import TINY_PROMPTS, LengthReward

from agents.ab_test import ab_report, wilson_interval
from agents.cli import main
from agents.compare import bootstrap_interval, compare_models, paired_bootstrap_interval
from agents.labeling import LabelStore, load_pairs_to_label
from text_env import tasks
from text_env.prompts import Example
from text_env.tasks import Task, register_task

TRAIN = ["--reward-model", "gold", "--total-timesteps", "32", "--n-envs", "2", "--n-steps", "16", "--batch-size", "16",
         "--n-epochs", "1", "--eval-prompts", "4", "--no-bf16", "--max-new-tokens", "4"]  # fmt: skip


class Solved(LengthReward):
    """The 'a' share of a completion, and code's pass@1 rule: a completion with score 1 solved its problem."""

    @staticmethod
    def pass_at_1(scores: Sequence[float]) -> float:
        return float(np.mean(np.asarray(scores) >= 1.0))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))
    register_task(
        "tiny-a", lambda: Task("tiny-a", TINY_PROMPTS, TINY_PROMPTS, Solved, max_new_tokens=4, max_prompt_tokens=24)
    )


@pytest.fixture
def trained(tiny_model: Path, tmp_path: Path) -> Path:
    """A finished `textgen train` run on the tiny task (4 held-out prompts)."""
    main(["train", "--model", str(tiny_model), "--task", "tiny-a", *TRAIN, "--out", str(tmp_path / "runs")])
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


def evaluate_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["evaluate", *argv])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the intervals, by hand -----------------------------------------------------------------------------------------


def test_paired_bootstrap_by_hand() -> None:
    """Four resamples of five prompts: the interval is the 2.5 / 97.5 percentiles of the resampled differences,
    each computed on the same prompts for both models."""
    a = np.array([0.1, 0.4, 0.3, 0.9, 0.5])
    b = np.array([0.2, 0.4, 0.1, 0.6, 0.5])
    idx = np.random.default_rng(7).integers(0, 5, size=(4, 5))  # what the function draws with seed 7
    differences = [(a[i] - b[i]).mean() for i in idx]
    expected = (float((a - b).mean()), *np.percentile(differences, [2.5, 97.5]))
    got = paired_bootstrap_interval(lambda i: a[i].mean(), lambda i: b[i].mean(), 5, seed=7, resamples=4)
    assert got == pytest.approx(expected)
    assert bootstrap_interval(lambda i: a[i].mean(), 5, seed=7, resamples=4) == pytest.approx(
        (a.mean(), *np.percentile([a[i].mean() for i in idx], [2.5, 97.5]))
    )
    same = paired_bootstrap_interval(lambda i: a[i].mean(), lambda i: a[i].mean(), 5, seed=7)
    assert same == (0.0, 0.0, 0.0)  # paired: the shared prompts cancel exactly


def test_wilson_interval_by_hand() -> None:
    low, high = wilson_interval(7, 10)  # p = 0.7, z = 1.96: (0.7 + 0.19208) / 1.38415 ± 0.28402 / 1.38415
    z = 1.959963984540054
    centre = (0.7 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.7 * 0.3 / 10 + z * z / 400) / (1 + z * z / 10)
    assert (low, high) == pytest.approx((centre - half, centre + half)) and (low, high) == pytest.approx(
        (0.3968, 0.8922), abs=1e-4
    )
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 0) == (0, 1)


# --- the table ------------------------------------------------------------------------------------------------------


def test_a_run_evaluates_as_its_own_after_table(
    trained: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`textgen evaluate RUN` samples the run's held-out prompts with its settings and seed: the same figures as the
    after-table of `textgen train`; the base model beside it, with paired differences; saved as markdown and JSON."""
    code, out, err = evaluate_cli([str(trained), str(tiny_model), "--out", str(trained.parent / "ev")], capsys)
    assert code == 0, err
    after = json.loads((trained / "report.json").read_text())["after"]
    (saved,) = (trained.parent / "ev").iterdir()
    record = json.loads((saved / "report.json").read_text())
    run_row, base_row = record["rows"]
    for metric in ("reward_model_score", "gold_score", "kl", "perplexity", "distinct_1", "distinct_2", "length"):
        assert run_row["metrics"][metric][0] == pytest.approx(after[metric], abs=1e-6), metric
    mean, low, high = run_row["metrics"]["gold_score"]
    assert low <= mean <= high and "difference" in base_row and "difference" not in run_row
    assert base_row["metrics"]["kl"][0] == pytest.approx(0.0, abs=1e-6)  # the base model is the KL reference
    assert base_row["metrics"]["pass_at_1"] == pytest.approx(run_row["metrics"]["pass_at_1"], abs=1.0)  # present
    assert record["settings"]["n_prompts"] == 4 and len(record["samples"]) == 4
    assert out.startswith("| model | reward model | gold |") and "pass@1" in out and "Δ" in out
    assert (saved / "report.md").read_text().startswith("| model |")


def test_own_prompts_with_references_and_several_samples(tiny_model: Path, tmp_path: Path) -> None:
    """`--prompts FILE --reference-column C`: BLEU, chrF and ROUGE against the references; `--samples 3`: best-of-3
    (the reward model's pick) and mean-of-3 rows."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "summary": "a good film"}) + "\n" for p in TINY_PROMPTS))
    comparison = compare_models(
        [str(tiny_model)], task="tiny-a", prompts=str(data), reference_column="summary", samples=3,
        max_new_tokens=4, max_prompt_tokens=24,
    )  # fmt: skip
    names = [row["name"] for row in comparison.rows]
    assert names == [f"{tiny_model} (best of 3)", f"{tiny_model} (mean of 3)"]
    best, mean = (row["metrics"] for row in comparison.rows)
    assert {"bleu", "chrf", "rouge1", "rouge2", "rougeL"} <= set(best)
    assert best["reward_model_score"][0] >= mean["reward_model_score"][0]  # the best of three by the reward model
    assert comparison.settings["data"] == str(data) and comparison.settings["n_prompts"] == len(TINY_PROMPTS)
    every = comparison.record()["per_sample"][str(tiny_model)]  # every sample kept: [prompt][sample]
    assert np.array(every["chrf"]).shape == (len(TINY_PROMPTS), 3) and len(every["completions"][0]) == 3
    assert np.mean(every["reward_model_score"]) == pytest.approx(mean["reward_model_score"][0])


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["{empty}"], "holds no model"),
     (["{tiny}", "--prompts", "{prompts}", "--reference-column", "nope"], "nope"),
     (["{tiny}", "--prompts", "{blank}"], "no prompts"),
     (["{tiny}", "{other}"], "another tokenizer than the KL reference"),
     (["{tiny}", "/nonexistent/model"], "does not exist"),
     (["{tiny}", "--samples", "0"], "--samples must be at least 1"),
     (["{tiny}", "--human"], "--human compares two models")],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_model_loads(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str], message: str,
) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "the movie was", "summary": "x"}) + "\n")
    (tmp_path / "blank.jsonl").write_text("")
    from text_env.models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", vocab_size=120)  # another tokenizer
    names = {"empty": tmp_path / "empty", "tiny": tiny_model, "prompts": tmp_path / "p.jsonl",
             "blank": tmp_path / "blank.jsonl", "other": other}  # fmt: skip
    import agents.compare

    monkeypatch.setattr(agents.compare.Candidate, "load_policy", lambda *a: pytest.fail("a model was loaded"))
    capsys.readouterr()  # what building the other tiny model printed
    code, _, err = evaluate_cli([a.format(**names) for a in argv] + ["--task", "tiny-a"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err


# --- people, side by side ---------------------------------------------------------------------------------------


def _next_pair(driver: Any, shown: list[str]) -> str:
    """The pair the page shows once it is ready, one not shown before."""

    def ready() -> str | None:
        body = driver.find_element("tag name", "body")
        pid = body.get_attribute("data-pair-id")
        return pid if body.get_attribute("data-state") == "ready" and pid and pid not in shown else None

    return wait_for(ready, "the next pair")


def _sharpened(model: Path, out: Path) -> Path:
    """The tiny LM with its logits scaled up: the same tokenizer, other completions under the same seed (the random
    tiny LM's own distribution is so flat that the sampling noise alone picks its tokens)."""
    import torch
    from transformers import AutoTokenizer

    from text_env.models import load_causal_lm

    lm = load_causal_lm(str(model))
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(30.0)
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    import re

    process = subprocess.Popen([sys.executable, "-m", "agents.cli", "evaluate", *argv, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    printed: list[str] = []

    def address() -> str | None:
        line = process.stdout.readline()  # type: ignore[union-attr]
        printed.append(line)
        if process.poll() is not None and not line:
            raise AssertionError(f"textgen evaluate exited: {''.join(printed)}")
        found = re.search(r"A/B page: open (http://\S+)", line)
        return found.group(1) if found else None

    return process, wait_for(address, "the A/B page's address", timeout=120)


def _stop(process: subprocess.Popen[str], how: int = signal.SIGTERM) -> str:
    process.send_signal(how)
    out, _ = process.communicate(timeout=TIMEOUT)
    return out


@pytest.mark.browser
def test_blind_ab_page_judgements_survive_a_restart(tiny_model: Path, tmp_path: Path) -> None:
    """`textgen evaluate A B --human`: the page shows pairs with no model names; three judgements, the server killed
    and restarted, a fourth; nothing lost or doubled; the report's win rate of A over B and its Wilson interval are
    the hand count's."""
    from selenium.webdriver.common.action_chains import ActionChains

    other = _sharpened(tiny_model, tmp_path / "other")
    data = tmp_path / "judged.jsonl"
    argv = [str(tiny_model), str(other), "--human", "--data", str(data), "--annotator", "alice", "--n-prompts", "4",
            "--reward-model", "gold", "--max-new-tokens", "4", "--max-prompt-tokens", "128",
            "--out", str(tmp_path / "ev")]  # fmt: skip
    process, url = _start(argv)
    try:
        pairs_file = tmp_path / "judged.to-judge.jsonl"
        pairs = load_pairs_to_label(pairs_file)
        assert 3 <= len(pairs) <= 4  # prompts whose two completions differ
        with chromium(tmp_path / "profile") as driver:
            driver.get(url)
            shown: list[str] = []
            for key in ("a", "b", "t"):
                pid = _next_pair(driver, shown)
                text = driver.find_element("tag name", "body").text
                assert str(other) not in text and str(tiny_model) not in text  # blind: no model names
                shown.append(pid)
                ActionChains(driver).send_keys(key).perform()
            wait_for(lambda: len(data.read_text().splitlines()) == 2, "two decisive judgements on disk")
            undecided = tmp_path / "judged.undecided.jsonl"  # the tie: killed before it is written, it is asked again
            wait_for(lambda: undecided.is_file() and len(undecided.read_text().splitlines()) == 1, "the tie on disk")
            _stop(process, signal.SIGKILL)
            process, url = _start(argv)  # restart: the same pairs, nothing sampled again
            driver.get(url)
            if len(pairs) == 4:
                _next_pair(driver, shown)
                ActionChains(driver).send_keys("a").perform()
                wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-state") == "done", "done")
        out = _stop(process)
    finally:
        if process.poll() is None:
            process.kill()
    judged = [json.loads(line) for line in data.read_text().splitlines()]
    ties = [json.loads(line) for line in (tmp_path / "judged.undecided.jsonl").read_text().splitlines()]
    assert len({j["pair_id"] for j in judged + ties}) == len(judged) + len(ties) == len(pairs)  # none lost or doubled
    wins_a = sum((j["label"] == "a") == (j["ab_sides"] == "AB") for j in judged)  # side a was model A when "AB"
    report = json.loads(data.with_suffix(".report.json").read_text())
    assert report["people"]["wins"] == wins_a and report["people"]["losses"] == len(judged) - wins_a
    assert report["people"]["ties"] == 1
    assert report["people"]["interval"] == pytest.approx(list(wilson_interval(wins_a, len(judged))))
    assert report["models"] == {"A": str(tiny_model), "B": str(other)} and "win rate of A over B" in out
    store = LabelStore(pairs, data)
    assert ab_report(store, pairs_file)["people"] == report["people"]  # the report re-reads to the same figures
    store.close()


def test_ab_report_counts_every_judgement_once(tmp_path: Path) -> None:
    """By hand: three pairs, two annotators, one tie; A is shown as side b on the second pair."""
    from agents.ab_test import write_ab_pairs

    examples = [Example(p) for p in ("p1", "p2", "p3", "p4")]
    a, b = ["x1", "x2", "x3", "same"], ["y1", "y2", "y3", "same"]
    pairs = write_ab_pairs(examples, a, b, tmp_path / "d.to-judge.jsonl", ["modelA", "modelB"])
    assert len(pairs) == 3  # the identical pair is left out
    store = LabelStore(pairs, tmp_path / "d.jsonl", LengthReward())
    side_of_a = {p.pair_id: "a" if p.meta["ab_sides"] == "AB" else "b" for p in pairs}
    other = {"a": "b", "b": "a"}
    store.record(pairs[0].pair_id, "ann1", side_of_a[pairs[0].pair_id])  # A wins
    store.record(pairs[1].pair_id, "ann1", other[side_of_a[pairs[1].pair_id]])  # B wins
    store.record(pairs[2].pair_id, "ann1", "tie")
    store.record(pairs[0].pair_id, "ann2", side_of_a[pairs[0].pair_id])  # A wins again: agreement 1.0 on pair 0
    report: dict[str, Any] = ab_report(store, tmp_path / "d.to-judge.jsonl")
    store.close()
    assert (report["people"]["wins"], report["people"]["losses"], report["people"]["ties"]) == (2, 1, 1)
    assert report["people"]["rate"] == pytest.approx(2 / 3)
    assert report["people"]["interval"] == pytest.approx(list(wilson_interval(2, 3)))
    assert report["identical_completions"] == 1 and report["agreement"] == {"pairs": 1, "rate": 1.0}
    assert report["gold"]["wins"] + report["gold"]["losses"] + report["gold"]["ties"] == 3
