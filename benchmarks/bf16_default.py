"""Why bf16 autocast is on by default only where the CPU runs it natively (``text_env.models.DEFAULT_BF16``).

Side by side in one process, alternating, median of ``--repeats``: one forward pass (what a rollout step and the
reference/reward passes run) and one forward + backward (what a PPO minibatch runs) of the model over a batch of
``--batch`` rows of ``--tokens`` tokens, in float32 and under bf16 autocast; and one matmul of the default model's MLP
shape (256 x 576 @ 576 x 1536). On a CPU with oneDNN's bf16 kernels (AVX-512, AVX512-BF16, AMX) bf16 is the faster
one; on an AVX2-only CPU bf16 falls back to a generic kernel and is many times slower, which is why the default
follows :func:`text_env.models.native_bf16` instead of being on everywhere.

Run: ``python benchmarks/bf16_default.py`` (the embedded default model; writes ``bf16_default_<cpu>.md`` / ``.json``
under ``--out``, one file per CPU kind so each machine's figures stay beside the others); ``--quick`` with a tiny
model checks that every figure is produced (what CI runs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from agents.train import cpu_kind
from text_env.models import DEFAULT_MODEL, load_causal_lm, make_tiny_model, native_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from rollout_and_update import median_seconds


def passes(model: Any, batch: int, tokens: int, bf16: bool) -> dict[str, Callable[[], object]]:
    """The forward and the forward + backward of ``model`` over one random batch, with bf16 autocast or without."""
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))

    def forward() -> object:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=ids).logits

    def forward_backward() -> object:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss

    return {"forward": forward, "forward_backward": forward_backward}


def matmul(rows: int, inner: int, cols: int, dtype: torch.dtype) -> Callable[[], object]:
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
    return lambda: a @ b


def measure(model_name: str, batch: int, tokens: int, repeats: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    model = load_causal_lm(model_name)
    results: dict[str, Any] = {}
    fp32, bf16 = passes(model, batch, tokens, False), passes(model, batch, tokens, True)
    for name in fp32:
        seconds = median_seconds([fp32[name], bf16[name]], repeats)
        results[name] = {"float32_s": seconds[0], "bf16_s": seconds[1], "bf16_over_float32": seconds[1] / seconds[0]}
    seconds = median_seconds([matmul(*shape, torch.float32), matmul(*shape, torch.bfloat16)], repeats)
    results["matmul"] = {"float32_s": seconds[0], "bf16_s": seconds[1], "bf16_over_float32": seconds[1] / seconds[0]}
    return results


def markdown(result: dict[str, Any], command: str) -> str:
    labels = {"forward": "forward", "forward_backward": "forward + backward", "matmul": "matmul {}x{} @ {}x{}"}
    rows, cols, inner = result["matmul_shape"][0], result["matmul_shape"][2], result["matmul_shape"][1]
    lines = [
        "# bf16 autocast against float32 on this CPU", "", f"Command: `{command}`", "",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} thread(s). Model: "
        f"`{result['model']}`, a batch of {result['batch']} x {result['tokens']} tokens; median of "
        f"{result['repeats']}, the two dtypes alternating.", "",
        f"oneDNN bf16 kernels here (`native_bf16()`): **{result['native_bf16']}**, so bf16 is "
        f"**{'on' if result['native_bf16'] else 'off'}** by default on this machine.", "",
        "| pass | float32 (s) | bf16 autocast (s) | bf16 / float32 |", "|---|---|---|---|",
    ]  # fmt: skip
    for key, row in result["passes"].items():
        label = labels[key].format(rows, inner, inner, cols)
        lines.append(f"| {label} | {row['float32_s']:.4f} | {row['bf16_s']:.4f} | {row['bf16_over_float32']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny model and batch (seconds)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    shape = (16, 32, 64) if args.quick else (256, 576, 1536)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(Path(tmp) / "tiny-lm")) if args.quick else args.model
        if args.quick:
            args.batch, args.tokens, args.repeats = 2, 8, 1
        passes_ = measure(model, args.batch, args.tokens, args.repeats, shape)
    machine = cpu_kind()
    result = {
        "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(), "model": "tiny" if args.quick else args.model, "batch": args.batch,
        "tokens": args.tokens,
        "repeats": args.repeats, "matmul_shape": list(shape), "passes": passes_,
    }  # fmt: skip
    kind = "quick" if args.quick else re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bf16_default.py " + " ".join(argv)
    (out / f"bf16_default_{kind}.md").write_text(markdown(result, command.strip()))
    (out / f"bf16_default_{kind}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result, command.strip()))
    return result


if __name__ == "__main__":
    main()
