"""What ``textgen sft``'s loss at the reference positions saves against the stock loss over every column's logits.

One SFT step's forward + backward as ``textgen sft`` runs it (the default model, LoRA r = 16, activation checkpointing,
bf16 where the CPU runs it natively) on each task's largest batch: 8 rows of its whole prompt budget plus its whole
completion budget (what rows of a user's ``--prompts`` data can reach; the tasks' own train rows are shorter), random
tokens, the loss on the completion only. Two losses:

- ``stock``: ``model(..., labels=...).loss``, the causal LM's own, which takes the logits of every column;
- ``reference``: :func:`agents.sft.reference_loss` (the LM head at the reference positions only), what ``textgen sft``
  uses.

Each loss and task runs in a fresh process: the rise of peak RSS (``VmHWM``) over its passes, seconds per pass (the
first dropped), and the loss (both must agree). ``--mmap-thresholds`` adds the reference loss under glibc's
``MALLOC_MMAP_THRESHOLD_`` at each value: much of the rise is freed buffers that glibc's heap keeps for the next pass,
and a fixed threshold hands large ones back at once, at the price of faulting fresh pages in. Run:
``python benchmarks/sft_loss_memory.py --mmap-thresholds 8388608,65536`` (~25 minutes on 2 cores); ``--quick`` runs a
tiny model on short rows (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from agents.policies import LORA_DEFAULTS, release_free_heap
from agents.sft import reference_loss
from agents.train import cpu_kind, status_gb
from text_env.models import DEFAULT_BF16, DEFAULT_MODEL, load_causal_lm, lora_model
from text_env.tasks import get_task

TASKS = ("summarize-docstring", "code")
LOSSES = ("stock", "reference")
ROWS = 8  # textgen sft's default batch size


def measure(loss_name: str, model: str, prompt: int, completion: int, passes: int, bf16: bool) -> dict[str, Any]:
    """Forward + backward of one batch ``passes`` times in this process: peak RSS rise (GB), seconds, loss."""
    torch.manual_seed(0)
    lm = lora_model(load_causal_lm(model), **LORA_DEFAULTS)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()
    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (ROWS, prompt + completion))
    labels = ids.clone()
    labels[:, :prompt] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_gb("VmRSS")
    seconds, losses = [], []
    for _ in range(passes):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm(**inputs).loss if loss_name == "stock" else reference_loss(lm, inputs)
        loss.backward()
        lm.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    return {"peak_rise_gb": status_gb("VmHWM") - before, "seconds": statistics.median(seconds[1:] or seconds),
            "loss_value": losses[0]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model on short rows (CI)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--mmap-thresholds", default="", help="comma-separated MALLOC_MMAP_THRESHOLD_ bytes to add")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", nargs=4, metavar=("LOSS", "PROMPT", "COMPLETION", "BF16"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        loss_name, prompt, completion, bf16 = args.child
        print(json.dumps(measure(loss_name, args.model, int(prompt), int(completion), args.passes, bf16 == "1")))
        return {}
    bf16 = DEFAULT_BF16 and not args.quick
    shapes = {"quick": (24, 8)} if args.quick else {
        t: (get_task(t).max_prompt_tokens, get_task(t).max_new_tokens) for t in TASKS}  # fmt: skip
    thresholds = [int(t) for t in args.mmap_thresholds.split(",") if t]
    rows = []
    for task, (prompt, completion) in shapes.items():
        for loss_name, threshold in [*((name, None) for name in LOSSES), *(("reference", t) for t in thresholds)]:
            command = [sys.executable, __file__, "--model", args.model, "--passes", str(args.passes),
                       "--child", loss_name, str(prompt), str(completion), str(int(bf16))]  # fmt: skip
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else {})}
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"task": task, "loss": loss_name, "mmap_threshold": threshold, "prompt": prompt,
                         "completion": completion, **result})  # fmt: skip
            print(rows[-1], flush=True)
    machine = f"{cpu_kind()}, torch {torch.__version__}, {'bf16' if bf16 else 'float32'}"
    command = " ".join(["python benchmarks/sft_loss_memory.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# textgen sft: the loss at the reference positions against the stock loss over every column", "",
        f"Command: `{command}`", "", f"Machine: {machine}; {args.passes} passes of forward + backward of {ROWS} rows"
        " (LoRA r = 16, activation checkpointing), each loss and task in a fresh process.", "",
        "| task | rows x (prompt + completion) | loss | MALLOC_MMAP_THRESHOLD_ | peak RSS rise | s / pass | loss |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        threshold = r["mmap_threshold"] or "unset"
        lines.append(f"| {r['task']} | {ROWS} x ({r['prompt']} + {r['completion']}) | {r['loss']} | {threshold} | "
                     f"{r['peak_rise_gb']:.2f} GB | {r['seconds']:.1f} | {r['loss_value']:.4f} |")  # fmt: skip
    lines.append("")
    for task in shapes:
        stock, ours = (next(r for r in rows if r["task"] == task and r["loss"] == name and not r["mmap_threshold"])
                       for name in LOSSES)  # fmt: skip
        lines.append(f"- {task}: the reference loss rises {stock['peak_rise_gb'] - ours['peak_rise_gb']:.2f} GB less "
                     f"({ours['peak_rise_gb'] / stock['peak_rise_gb']:.2f}x) and takes "
                     f"{ours['seconds'] / stock['seconds']:.2f}x the time of a pass.")  # fmt: skip
        for r in rows:
            if r["task"] == task and r["mmap_threshold"]:
                lines.append(f"  With MALLOC_MMAP_THRESHOLD_={r['mmap_threshold']} it rises {r['peak_rise_gb']:.2f} GB "
                             f"in {r['seconds'] / ours['seconds']:.2f}x its time.")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "sft_loss_memory_quick" if args.quick else "sft_loss_memory"
    results = {"command": command, "machine": machine, "rows": rows}
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
