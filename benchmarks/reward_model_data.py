"""How much do more preference pairs and the feature layers buy the default reward model? A learning curve.

One backbone pass over every pair gives the pooled states of blocks 1 and 20 side by side (the shipped model's
``layer: [1, 20]``); a linear head is fitted on the first *m* pairs of ``train-rm``'s train split for several *m*,
on block 20 alone and on blocks 1 + 20, exactly as ``train-rm`` fits it (``fit_head``: the weight decay chosen on
the whole validation split). Every row is reported on the same test split, which chose nothing. Run::

    python benchmarks/reward_model_data.py        # the shipped 10,000 pairs of positive-review (~8 min here)

Writes ``benchmarks/results/reward_model_data.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts (not a package)
from reward_model_layers import metrics, save_json, split_with_gold

from agents.train import cpu_kind
from text_env.rewards.reward_model import RewardHead, RewardModel, RewardModelConfig
from text_env.rewards.training import _features, fit_head


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="preference JSONL (default: the shipped positive-review pairs)")
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--layers", default="1,20", help="blocks side by side (the shipped ones); the last alone too")
    parser.add_argument("--sizes", default="1400,2800,5600", help="train-split prefixes fitted (and the whole split)")
    parser.add_argument("--out", default="benchmarks/results/reward_model_data")
    argv = sys.argv[1:] if argv is None else argv  # the command in the results is the one that was run
    args = parser.parse_args(argv)
    data, (train, val, test), gold_c, gold_r = split_with_gold(args.data)
    pairs = [*train, *val, *test]
    started = time.time()
    layers = [int(k) for k in args.layers.split(",")]
    model = RewardModel(RewardModelConfig(backbone=args.backbone, layer=layers))
    feats = _features(model.features, pairs, batch_size=40, progress=True)  # (2N, 2H): chosen, then rejected
    total, hidden = len(pairs), feats.shape[-1] // len(layers)
    n, n_val = len(train), len(val)
    v, t = slice(n, n + n_val), slice(n + n_val, total)
    sizes = sorted({*(int(s) for s in args.sizes.split(",") if int(s) < n), n})
    rows = []
    alone, together = f"block {layers[-1]}", "blocks " + " + ".join(map(str, layers))
    for name, columns in ((alone, slice(hidden * (len(layers) - 1), None)), (together, slice(None))):
        f_c, f_r = feats[:total, columns], feats[total:, columns]
        for m in sizes:
            keep = torch.cat([torch.arange(m), torch.arange(n, n + n_val)])  # the first m train pairs, all validation
            head = RewardHead(f_c.shape[-1])
            _, decay, _ = fit_head(head, f_c[keep], f_r[keep], m)
            with torch.no_grad():
                s_c, s_r = head.raw(f_c).double().numpy(), head.raw(f_r).double().numpy()
            rows.append({"features": name, "train_pairs": m, "weight_decay": decay,
                         "validation": metrics(s_c[v], s_r[v], gold_c[v], gold_r[v]),
                         "test": metrics(s_c[t], s_r[t], gold_c[t], gold_r[t])})  # fmt: skip
            print(name, m, rows[-1]["test"], flush=True)
    result = {
        "data": data, "split": {"train": n, "validation": n_val, "test": total - n - n_val, "seed": 0},
        "rows": rows, "seconds": time.time() - started,
        "machine": f"{cpu_kind()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }  # fmt: skip
    title = "Reward model: more pairs, and which blocks' features"
    out, lines = save_json(args.out, result, title, "reward_model_data.py", argv)
    lines += [
        f"Data: `{data}`; split {result['split']} (`train-rm`'s). Each row fits a linear head on the first *m* train "
        "pairs (weight decay chosen on the whole validation split) and is measured on the same test split. Large gap: "
        "pairs whose gold differs by >= 0.5.", "",
        "| features | train pairs | test gold acc. | test large-gap acc. (n) | test Spearman | val. large-gap | "
        "val. Spearman |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        te, va = r["test"], r["validation"]
        lines.append(f"| {r['features']} | {r['train_pairs']} | {te['gold_accuracy']:.3f} | "
                     f"{te['large_gap_accuracy']:.3f} ({te['n_large_gap']}) | {te['spearman']:.3f} | "
                     f"{va['large_gap_accuracy']:.3f} | {va['spearman']:.3f} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
