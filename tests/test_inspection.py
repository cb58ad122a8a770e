"""`textgen inspect`: the per-token arrays of a saved tiny-model run are the models' own numbers (checked against plain
forward passes), the page is self-contained and safe for any text, runs are found however they were saved, and a
headless Chromium shows coloured tokens for both models on the served page and the static file."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import chromium, serving, wait_for

from agents.cli import main
from agents.inspection import ENGINES, inspect_run, is_saved_run, load_run, make_inspection_app, render_html
from agents.run import TrainConfig
from agents.train import train
from text_env.models import load_causal_lm, load_tokenizer
from text_env.prompts import encode_prompt
from text_env.rewards.gold import VaderSentiment
from text_env.tasks import get_task

N_PROMPTS = 3


@pytest.fixture(scope="module")
def run_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `textgen train` run of seconds on the tiny LM (LoRA, so the reference is the adapters turned off)."""
    config = TrainConfig(
        model=str(tiny_model), reward_model="gold", total_timesteps=32, n_envs=2, n_steps=8, batch_size=8, n_epochs=1,
        eval_prompts=2, bf16=False, max_new_tokens=6, max_prompt_tokens=128, lora_r=4, learning_rate=1e-2,
        out=str(tmp_path_factory.mktemp("runs")),
    )  # fmt: skip
    return Path(train(config)["run_dir"])


@pytest.fixture(scope="module")
def view(run_dir: Path) -> Any:
    return inspect_run(run_dir, n_prompts=N_PROMPTS)


@torch.no_grad()
def log_probs_of(lm: torch.nn.Module, prompt_ids: list[int], ids: np.ndarray) -> np.ndarray:
    """Ground truth: ``log p(token t | prompt, tokens < t)`` from one plain forward pass (no padding, no cache)."""
    tokens = torch.tensor([prompt_ids + ids.tolist()])  # (1, P + T)
    logits = lm(input_ids=tokens).logits[0, len(prompt_ids) - 1 : -1].float()  # (T, V)
    return torch.log_softmax(logits, -1).gather(1, torch.as_tensor(ids).reshape(-1, 1)).squeeze(1).numpy()


def test_per_token_arrays_are_the_models_numbers(view: Any, run_dir: Path, tiny_model: Path) -> None:
    task = get_task("positive-review")
    assert view.prompts == task.eval_prompts[:N_PROMPTS]
    assert [t.prompt for t in view.base] == [t.prompt for t in view.trained] == view.prompts
    base_lm, tokenizer = load_causal_lm(str(tiny_model)), load_tokenizer(str(tiny_model))
    trained_lm = load_run(run_dir).policy.language_model()[0]
    for trace in view.base + view.trained:
        n = len(trace.token_ids)
        assert 1 <= n <= 6 and all(len(a) == n for a in (trace.tokens, trace.log_prob, trace.kl, trace.value))
        assert "".join(trace.tokens) == tokenizer.decode(trace.token_ids.tolist())  # the pieces are the text
        assert trace.completion == tokenizer.decode(trace.token_ids.tolist(), skip_special_tokens=True)
        np.testing.assert_allclose(trace.kl, trace.log_prob - trace.ref_log_prob)
        prompt_ids = encode_prompt(tokenizer, trace.prompt, task.instruction)
        np.testing.assert_allclose(trace.ref_log_prob, log_probs_of(base_lm, prompt_ids, trace.token_ids), atol=1e-4)
        np.testing.assert_allclose(trace.log_prob, log_probs_of(trained_lm, prompt_ids, trace.token_ids), atol=1e-4)
        gold = VaderSentiment().score([trace.prompt], [trace.completion])[0]
        assert trace.gold_score == pytest.approx(gold) and trace.reward_model_score == pytest.approx(gold)  # 'gold' RM
    assert np.abs(np.concatenate([t.kl for t in view.trained])).max() > 1e-4  # training moved the policy
    assert np.ptp(np.concatenate([t.value for t in view.trained])) > 0  # the value head's estimates vary by state
    assert set(view.summary()) == {"base", "trained"} and view.meta["engine"] == "sb3"
    assert json.loads(json.dumps(view.to_dict()))["trained"][0]["kl"] == pytest.approx(view.trained[0].kl.tolist())


def test_same_seed_same_completions(view: Any, run_dir: Path) -> None:
    again = inspect_run(run_dir, n_prompts=N_PROMPTS)
    assert [t.completion for t in again.base + again.trained] == [t.completion for t in view.base + view.trained]


def test_page_is_self_contained_and_safe_for_any_text(run_dir: Path) -> None:
    hostile = "The film </script><script>alert(1)</script> & <b>"
    html = render_html(inspect_run(run_dir, prompts=[hostile]), title="a <title> & more")
    assert html.count("</script>") == 2  # the data's and the page's own: the prompt cannot close either
    assert "a &lt;title&gt; &amp; more" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from elsewhere
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert data is not None and json.loads(data.group(1))["prompts"] == [hostile]


def test_runs_are_found_however_they_were_saved(run_dir: Path, tmp_path: Path) -> None:
    interrupted = tmp_path / "interrupted"  # Ctrl-C'd: only checkpoint/model.zip
    (interrupted / "checkpoint").mkdir(parents=True)
    shutil.copy(run_dir / "config.json", interrupted)
    shutil.copy(run_dir / "model.zip", interrupted / "checkpoint")
    assert load_run(interrupted).checkpoint == interrupted / "checkpoint" / "model.zip"

    from agents.rlhf import RLHFConfig

    loop = tmp_path / "rlhf-positive-review"  # textgen rlhf: the last round with a policy, on its reward model
    config = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    (loop / "config.json").parent.mkdir()
    (loop / "config.json").write_text(json.dumps(dataclasses.asdict(RLHFConfig(config, rounds=3))))
    for r in (1, 2):
        (loop / f"round-{r}" / "checkpoint").mkdir(parents=True)
        shutil.copy(run_dir / "model.zip", loop / f"round-{r}" / "checkpoint")
    loaded = load_run(loop)
    assert loaded.checkpoint == loop / "round-2" / "checkpoint" / "model.zip"
    assert loaded.config.reward_model == str(loop / "round-1" / "reward_model")
    assert list(ENGINES) == ["sb3", "rllib"]
    (tmp_path / "an-rllib-run" / "checkpoint").mkdir(parents=True)  # an SB3 loader must not claim an RLlib run
    (tmp_path / "an-rllib-run" / "config.json").write_text(json.dumps({"engine": "rllib"}))
    assert [name for name, (detect, *_) in ENGINES.items() if detect(tmp_path / "an-rllib-run")] == ["rllib"]


def test_a_reference_task_is_inspected_with_its_records(run_dir: Path, tmp_path: Path) -> None:
    """The held-out prompts go to the env as records, so a gold scorer that needs references (dialogue's chrF) gets
    them; the view shows the prompt texts."""
    copy = tmp_path / "dialogue-run"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text()) | {"task": "dialogue", "max_prompt_tokens": 200}
    (copy / "config.json").write_text(json.dumps(config))
    view = inspect_run(copy, n_prompts=2)
    assert view.prompts == get_task("dialogue").eval_prompts[:2]
    assert all(-1.0 <= t.gold_score <= 1.0 for t in view.base + view.trained)


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda d: d / "missing", "does not exist"),
     (lambda d: d, "is not a saved run: expected config.json and a model.zip"),
     (lambda d: (d / "config.json").write_text("{}") and d, "has no model.zip")],
)  # fmt: skip
def test_a_directory_without_a_run_says_what_is_missing(tmp_path: Path, make: Any, message: str) -> None:
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "model.zip").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=message):
        load_run(make(tmp_path))


def test_pairs_to_label_sampled_from_a_runs_policy(run_dir: Path, tmp_path: Path) -> None:
    from agents.labeling import sample_pairs_to_label

    assert is_saved_run(run_dir) and not is_saved_run(tmp_path)
    pairs = sample_pairs_to_label(str(run_dir), tmp_path / "to-label.jsonl", n_pairs=2, max_new_tokens=3)
    assert len(pairs) == 2 and all(p.prompt in get_task("positive-review").train_prompts for p in pairs)


def test_a_policy_without_an_lm_is_refused(run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(run_dir, tmp_path / "baseline")
    config = json.loads((run_dir / "config.json").read_text())
    baseline = {**config, "algo": "ppo_bag_of_tokens", "advantage_normalization": "minibatch"}  # as its preset writes
    (tmp_path / "baseline" / "config.json").write_text(json.dumps(baseline))
    with pytest.raises(ValueError, match="policy without a language model"):
        load_run(tmp_path / "baseline")


def coloured_rows(driver: Any) -> dict[str, list[str]]:
    """The background colour of every token span, per model row."""
    script = "return [...document.querySelectorAll(`.row.${arguments[0]} .tok`)].map(s => s.style.backgroundColor)"
    return {name: driver.execute_script(script, name) for name in ("base", "trained")}


def check_coloured(driver: Any, n_prompts: int) -> None:
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "true", "the page to render")
    assert len(driver.find_elements("css selector", "section.example")) == n_prompts
    kl = coloured_rows(driver)
    for name, colours in kl.items():
        assert colours and all(re.fullmatch(r"rgba\(\d+, \d+, \d+, 0\.\d+\)", c) for c in colours), (name, colours)
        alphas = [float(c.rsplit(",", 1)[1].rstrip(")")) for c in colours]
        assert max(alphas) > 0.5, (name, alphas)  # the strongest token of each model is clearly coloured
    driver.find_element("css selector", "input[value=value]").click()
    wait_for(lambda: driver.execute_script("return document.body.dataset.metric") == "value", "the switch to V(s)")
    assert coloured_rows(driver) != kl  # the colours now show the value estimates


@pytest.mark.browser
def test_inspect_pages_colour_both_models_in_a_browser(view: Any, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "view.html"
    main(["inspect", str(run_dir), "--prompts", "2", "--html", str(out)])
    with chromium(tmp_path / "profile") as driver:
        driver.get(out.as_uri())  # the static export, as shared in a paper or an issue
        check_coloured(driver, 2)
        with serving(make_inspection_app(view)) as url:  # what textgen inspect --port serves
            driver.get(url)
            check_coloured(driver, N_PROMPTS)
            assert (
                driver.execute_script("return fetch('/api/inspection').then(r => r.json())")["prompts"] == view.prompts
            )
