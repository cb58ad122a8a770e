"""Which layer's features should the default reward model score? One backbone pass over every pair, a head per
layer (and per concatenation of a few layers, :data:`COMBINATIONS`), the features chosen on the validation split,
and only the chosen ones (beside the best single layer and the last) reported on the test split.

Run::

    python benchmarks/reward_model_layers.py        # the shipped pairs of positive-review (10,000: ~25 min here)
    git show e752d62:text_env/rewards/pretrained/positive-review/prefs.jsonl > first2000.jsonl
    python benchmarks/reward_model_layers.py --data first2000.jsonl   # what the committed results measured

Writes ``benchmarks/results/reward_model_layers.{md,json}``. The split is ``train-rm``'s
(``text_env.rewards.training.split_pairs``, validation 0.1, test 0.2, seed 0), so the chosen layer's test figures
are what ``textgen train-rm --layer L`` reports on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.train import cpu_kind
from text_env.rewards.preferences import load_preferences
from text_env.rewards.reward_model import RewardHead, RewardModel, RewardModelConfig
from text_env.rewards.training import LARGE_GAP, _spearman, fit_head, split_pairs
from text_env.tasks import get_task


@torch.no_grad()
def layer_features(model: RewardModel, prompts: list[str], texts: list[str], batch_size: int) -> torch.Tensor:
    """Pooled features of every layer: ``(n_layers + 1, N, H)``; index 0 is the last, normalised hidden state."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="backbone features (all layers)"):
        ids, mask, completion = model.encode(prompts[start : start + batch_size], texts[start : start + batch_size])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        pooled = [model.pool(hidden[-1], mask, completion)]  # the default until now: last, after the final norm
        pooled += [model.pool(h, mask, completion) for h in hidden[1:]]  # after block k = 1..n (the last pre-norm)
        out.append(torch.stack(pooled))
    return torch.cat(out, dim=1)


COMBINATIONS = [(1, 20), (16, 20), (18, 20), (20, 22), (1, 16, 20), (20, 0)]
"""Concatenated features tried beside single layers: the best single layers' neighbours, an early lexical layer, and
the last normalised state (index 0) beside the best middle one."""


def _features_name(layer: int | list[int] | None) -> str:
    if isinstance(layer, list):
        return "layers " + " + ".join(str(k or "last") for k in layer)
    return f"layer {layer}" if layer else "last, normalised"


def metrics(scores_c: np.ndarray, scores_r: np.ndarray, gold_c: np.ndarray, gold_r: np.ndarray) -> dict[str, float]:
    decided, large = gold_c != gold_r, np.abs(gold_c - gold_r) >= LARGE_GAP
    agree = (scores_c > scores_r) == (gold_c > gold_r)
    return {
        "label_accuracy": float(np.mean(scores_c > scores_r)),
        "gold_accuracy": float(np.mean(agree[decided])),
        "large_gap_accuracy": float(np.mean(agree[large])),
        "n_large_gap": int(large.sum()),
        "spearman": _spearman(np.concatenate([scores_c, scores_r]), np.concatenate([gold_c, gold_r])),
    }


def split_with_gold(data: str | None) -> tuple[str, tuple[list, list, list], np.ndarray, np.ndarray]:
    """``data`` (default: the shipped positive-review pairs, as a relative path for the results), ``train-rm``'s
    split of it, and the gold scores of every pair's chosen and rejected completion (train, validation, test order)."""
    task = get_task("positive-review")
    data = data or os.path.relpath(Path(task.reward_model) / "prefs.jsonl")
    train, val, test = split_pairs(load_preferences(data), validation=0.1, test=0.2, seed=0)
    pairs = [*train, *val, *test]
    prompts = [p.prompt for p in pairs]
    gold_c, gold_r = (task.gold.score(prompts, [getattr(p, side) for p in pairs]) for side in ("chosen", "rejected"))
    return data, (train, val, test), gold_c, gold_r


def save_json(args_out: str, result: dict, title: str, script: str, argv: list[str]) -> tuple[Path, list[str]]:
    """Write ``<out>.json``; return the ``.md`` path and its first lines (title and the exact command)."""
    out = Path(args_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    command = f"python benchmarks/{script}{' ' + ' '.join(argv) if argv else ''}"
    return out, [f"# {title}", "", f"Command: `{command}` ({result['seconds']:.0f} s; {result['machine']})", ""]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="preference JSONL (default: the shipped positive-review pairs)")
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/reward_model_layers")
    argv = sys.argv[1:] if argv is None else argv  # the command in the results is the one that was run
    args = parser.parse_args(argv)
    data, (train, val, test), gold_c, gold_r = split_with_gold(args.data)
    pairs = [*train, *val, *test]
    started = time.time()
    model = RewardModel(RewardModelConfig(backbone=args.backbone))
    prompts = [p.prompt for p in pairs] * 2
    feats = layer_features(model, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], args.batch_size)
    n, n_val, total = len(train), len(val), len(pairs)
    rows = []
    combinations = [c for c in COMBINATIONS if max(c) < feats.shape[0]]  # those a smaller backbone has
    for layers in [(k,) for k in range(feats.shape[0])] + combinations:
        chosen = torch.cat([feats[k] for k in layers], dim=-1)  # (2 * total, H * len(layers))
        head = RewardHead(chosen.shape[-1])
        f_c, f_r = chosen[:total], chosen[total:]
        _, decay, _ = fit_head(head, f_c[: n + n_val], f_r[: n + n_val], n)
        with torch.no_grad():
            s_c, s_r = head.raw(f_c).double().numpy(), head.raw(f_r).double().numpy()
        diff = torch.from_numpy(s_c[n : n + n_val] - s_r[n : n + n_val])
        val_loss = float(-torch.nn.functional.logsigmoid(diff).mean())  # what chooses: labels only, no gold
        v, t = slice(n, n + n_val), slice(n + n_val, None)
        rows.append({"layer": (layers[0] or None) if len(layers) == 1 else list(layers), "weight_decay": decay,
                     "validation_loss": val_loss,
                     "validation": metrics(s_c[v], s_r[v], gold_c[v], gold_r[v]),
                     "_test": metrics(s_c[t], s_r[t], gold_c[t], gold_r[t])})  # fmt: skip
    best = min(rows, key=lambda r: r["validation_loss"])
    single = min((r for r in rows if not isinstance(r["layer"], list)), key=lambda r: r["validation_loss"])
    last = rows[0]
    result = {
        "data": data, "split": {"train": n, "validation": n_val, "test": total - n - n_val, "seed": 0},
        "chosen_layer": best["layer"], "chosen_test": best["_test"], "best_single_layer": single["layer"],
        "best_single_layer_test": single["_test"], "last_layer_test": last["_test"],
        "layers": [{k: v for k, v in r.items() if k != "_test"} for r in rows], "seconds": time.time() - started,
        "machine": f"{cpu_kind()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }  # fmt: skip
    out, lines = save_json(args.out, result, "Reward-model features: which layer", "reward_model_layers.py", argv)
    lines += [
        f"Data: `{data}`; split {result['split']} (train fits a linear head per layer and weight decay; validation "
        "chooses the weight decay and the features, by Bradley-Terry loss on the labels; test is reported for the "
        "chosen features, the best single layer (the shipped reward model's `--layer`) and the last normalised "
        "hidden state). Candidates: every single layer, then concatenations of a few layers' features "
        f"({', '.join('+'.join(map(str, c)) for c in combinations) or 'none fit this backbone'}; 0: the last, normed).",
        "",
        "| features | test label acc. | test gold acc. | test large-gap acc. | test Spearman |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    shown = {f"{_features_name(best['layer'])} (chosen)": best["_test"]}
    if single is not best:
        shown[f"{_features_name(single['layer'])} (best single layer)"] = single["_test"]
    shown["last, normalised"] = last["_test"]
    for name, t in shown.items():
        lines.append(f"| {name} | {t['label_accuracy']:.3f} | {t['gold_accuracy']:.3f} | "
                     f"{t['large_gap_accuracy']:.3f} (n={t['n_large_gap']}) | {t['spearman']:.3f} |")  # fmt: skip
    lines += ["", "| features | validation loss | val. label acc. | val. large-gap acc. | val. Spearman |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        v = r["validation"]
        lines.append(f"| {_features_name(r['layer'])} | {r['validation_loss']:.4f} | {v['label_accuracy']:.3f} | "
                     f"{v['large_gap_accuracy']:.3f} | {v['spearman']:.3f} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
