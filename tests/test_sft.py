"""`textgen sft` on a tiny model: it learns the references (loss on them alone), stops early on a slice of the train
split, saves a model `textgen train --init` and `textgen preferences --init` start from; refusals are one line; an
interrupted run resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import interrupt_textgen

from agents.cli import main
from agents.sft import SECONDS, SFTConfig, _collate, _encode, reference_loss, reference_perplexity
from text_env import tasks
from text_env.models import load_tokenizer, make_tiny_model
from text_env.prompts import Example

REPLIES = ["a good film", "a great film", "a fine film", "a nice film"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LM with room for dialogue's 96-token prompts in its finer tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-512"), max_positions=512)


@pytest.fixture
def records(tmp_path: Path) -> Path:
    """40 short prompts, each with a reply as its reference."""
    path = tmp_path / "replies.jsonl"
    lines = [json.dumps({"prompt": f"say something {i}", "reply": REPLIES[i % 4]}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_argv(model: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["sft", "--task", "dialogue", "--model", str(model), "--prompts", str(data), "--reference-column", "reply",
            "--eval-prompts", "4", "--max-prompt-tokens", "256", "--no-bf16", "--batch-size", "8", "--out", str(out),
            *more]  # fmt: skip


def test_the_loss_is_on_the_reference_tokens_alone(long_model: Path) -> None:
    tokenizer = load_tokenizer(str(long_model))
    (row,) = _encode(tokenizer, Example("say hello", ("a good film",)), None, max_prompt=64, max_new=32)
    prompt = tokenizer("say hello")["input_ids"]
    assert row["input_ids"][: len(prompt)] == prompt and row["labels"][: len(prompt)] == [-100] * len(prompt)
    reply = tokenizer("a good film", add_special_tokens=False)["input_ids"]
    assert row["labels"][len(prompt) :] == [*reply, tokenizer.eos_token_id]
    (cut,) = _encode(tokenizer, Example("say hello", ("a good film",)), None, max_prompt=64, max_new=3)
    assert cut["labels"][len(prompt) :] == [*reply[:2], tokenizer.eos_token_id]  # max_new_tokens, EOS included
    assert _encode(tokenizer, Example("say hello", ("x",)), None, max_prompt=1, max_new=8) == []  # too long a prompt


def test_sft_learns_the_references_then_ppo_starts_from_it(
    long_model: Path, records: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    main(sft_argv(long_model, records, tmp_path / "sft", "--epochs", "3", "--learning-rate", "5e-3"))
    (run_dir,) = (tmp_path / "sft").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["after"]["reference_perplexity"] < report["before"]["reference_perplexity"]
    assert report["records"] == {"train": 36, "validation": 4, "rows": 36}  # a slice of the train split, not eval
    assert 1 <= report["best_epoch"] <= len(report["validation_loss"]) <= 3
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / "trainer").exists()
    assert json.loads((run_dir / "config.json").read_text())["command"] == "sft"

    main(["train", "--task", "dialogue", "--init", str(run_dir), "--reward-model", "gold", "--total-timesteps", "16",
          "--n-envs", "2", "--n-steps", "8", "--batch-size", "8", "--max-new-tokens", "4", "--eval-prompts", "2",
          "--max-prompt-tokens", "256", "--no-bf16", "--out", str(tmp_path / "ppo")])  # fmt: skip
    (ppo,) = (tmp_path / "ppo").iterdir()
    trained = json.loads((ppo / "report.json").read_text())
    assert trained["config"]["model"] == str(run_dir / "model") == trained["kl_reference"]
    assert trained["before"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the SFT model is the KL reference
    assert "the SFT model of --init" in (ppo / "report.md").read_text()
    # textgen evaluate of the base, the SFT run and the PPO run from it: each row samples its own model (the base
    # and SFT rows sample with the PPO run's settings, whose --init must not replace their model)
    from agents import compare

    models, make_env = [], compare.make_env
    monkeypatch.setattr(
        compare, "make_env", lambda config, *a, **k: models.append(config.model) or make_env(config, *a, **k)
    )
    rows = compare.compare_models([str(long_model), str(run_dir), str(ppo)], n_prompts=2, max_new_tokens=4)
    assert models == [str(long_model), str(run_dir / "model"), str(run_dir / "model")]
    assert rows.settings["reference"] == str(long_model) and len(rows.rows) == 3

    pairs = tmp_path / "p.jsonl"
    main(["preferences", "--task", "dialogue", "--init", str(run_dir), "--pairs", "2", "--out", str(pairs),
          "--max-new-tokens", "4", "--batch-size", "2"])  # fmt: skip
    assert len(pairs.read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["sft", "--task", "positive-review"], "has no references to learn from"),
     (["sft", "--task", "concepts"], "has no references to learn from"),
     (["sft", "--prompts", "{records}"], "--prompts needs --reference-column"),
     (["sft", "--prompts", "{records}", "--reference-column", "nope"], "nope"),
     (["sft", "--prompts", "{empty}", "--reference-column", "reply"], "no prompts"),
     (["sft", "--epochs", "0"], "epochs must be at least 1"),
     (["train", "--init", "{records}"], "is not a finished textgen sft run")],
)  # fmt: skip
def test_bad_input_is_one_line_and_leaves_nothing(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    argv = [a.format(records=records, empty=tmp_path / "empty.jsonl") for a in argv]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_reference_loss_is_the_stock_loss_with_lora_and_padding(tiny_model: Path) -> None:
    """The loss from the head at the reference positions only equals the causal LM's own loss over every column, on
    rows of different prompt and reference lengths, right-padded, with LoRA, and so do the adapters' gradients."""
    from text_env.models import load_causal_lm, lora_model

    torch.manual_seed(0)
    lm = lora_model(load_causal_lm(str(tiny_model)), r=4, target_modules="all-linear", init_lora_weights=False)
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] * p + list(range(3 + p, 3 + n))}
            for n, p in ((12, 7), (9, 3), (15, 14))]  # fmt: skip
    inputs = _collate(rows, pad=0)
    grads = []
    for loss_of in (lambda: lm(**inputs).loss, lambda: reference_loss(lm, inputs)):
        loss = loss_of()
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in lm.parameters() if p.grad is not None]))
        lm.zero_grad(set_to_none=True)
    (stock, stock_grads), (ours, our_grads) = grads
    assert ours == pytest.approx(stock, rel=1e-5) and len(our_grads) == len(stock_grads) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(our_grads, stock_grads, strict=True))


def test_reference_perplexity_is_exp_of_the_stock_loss_per_reference_token(long_model: Path) -> None:
    """Held-out perplexity, batched over prompts of different lengths, is exp of the causal LM's own mean loss over
    every reference token (EOS included)."""
    from text_env.models import load_causal_lm

    examples = [Example(f"say {'hello ' * n}", (REPLIES[n % 4],)) for n in range(1, 11)]  # 10 rows: two batches
    ppl = reference_perplexity(str(long_model), examples, None, max_prompt=64, max_new=32, bf16=False)
    tokenizer, lm = load_tokenizer(str(long_model)), load_causal_lm(str(long_model))
    rows = [row for e in examples for row in _encode(tokenizer, e, None, max_prompt=64, max_new=32)]
    with torch.no_grad():
        nll = [float(lm(**_collate([r], pad=0)).loss) * (len(r["input_ids"]) - r["labels"].count(-100)) for r in rows]
    tokens = sum(len(r["input_ids"]) - r["labels"].count(-100) for r in rows)
    assert ppl == pytest.approx(math.exp(sum(nll) / tokens), rel=1e-5)


@pytest.mark.parametrize(
    ("family", "reshape"),
    [
        ("Gemma2", {"final_logit_softcapping": 0.5}),
        ("Cohere", {"logit_scale": 0.5}),
        ("Granite", {"logits_scaling": 4.0}),
    ],
)
def test_reference_loss_keeps_a_models_own_logit_reshaping(family: str, reshape: dict[str, float]) -> None:
    """Gemma 2 caps, Cohere scales and Granite divides their logits in their forward, after the LM head: the
    reference loss is still the stock loss."""
    import transformers

    from agents.sft import reference_loss

    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = getattr(transformers, f"{family}Config")(**sizes, num_key_value_heads=1, head_dim=8, **reshape)
    lm = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        assert float(reference_loss(lm, batch)) == pytest.approx(float(lm(**batch).loss), rel=1e-5)


def test_sft_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="0 < validation < 1"):
        SFTConfig(validation=1.0)


@pytest.mark.slow
def test_an_interrupted_sft_resumes(long_model: Path, records: Path, tmp_path: Path) -> None:
    """Ctrl-C saves a checkpoint after the step in progress and exits 130 with the command that continues it;
    --resume finishes the run."""
    argv = sft_argv(long_model, records, tmp_path / "sft", "--epochs", "4")
    code, err = interrupt_textgen(argv, tmp_path / "sft", "*/trainer/checkpoint-*")
    assert code == 130, err[-2000:]
    (run_dir,) = (tmp_path / "sft").iterdir()
    assert f"textgen sft --resume {run_dir}" in err and not (run_dir / "report.json").exists()
    before = max(json.loads(p.read_text())["train_seconds"] for p in run_dir.glob("trainer/checkpoint-*/" + SECONDS))
    main(["sft", "--resume", str(run_dir)])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["after"]["reference_perplexity"] > 0
    assert report["train_seconds"] > before > 0  # the time before the interruption is counted
