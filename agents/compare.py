"""``textgen evaluate``: several models on the same prompts, side by side, by metrics with bootstrap intervals.

Every model samples the same prompts with the same seed in its own TextGen env (the KV-cached batched path that
training rolls out with, :func:`agents.evaluate.evaluate`), is scored by the same reward model and gold scorer, and,
when the prompts carry references, by BLEU, chrF and ROUGE-1/2/L (sacrebleu, rouge-score); code by pass@1. Each mean
gets a 95 % bootstrap interval over prompts, and each model's difference from the first a paired bootstrap interval
(the same resampled prompts for both). ``samples=K`` draws K completions per prompt and reports best-of-K (the
completion the reward model scores highest) and mean-of-K; the report's ``per_sample`` keeps every sample's
completion and metrics, from which the spread of a score within and between prompts can be read.

A model is a run directory (``textgen train``, ``textgen rlhf``, ``--engine rllib``, ``textgen sft``), a directory
saved with ``save_pretrained`` (``textgen export``), ``default`` or a hub id. A run is evaluated with its own
settings (lengths, envs, reward model, bf16), so ``textgen evaluate RUN`` on the run's task and seed reproduces the
after-table of ``textgen train``. :mod:`agents.ab_test` asks people instead, on the same samples.

Example:
    >>> from agents.compare import compare_models
    >>> report = compare_models(["default", "runs/positive-review-ppo-<time>"], task="positive-review")
    >>> print(report.markdown())
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.evaluate import Evaluation, distinct_n, evaluate
from agents.run import TrainConfig, make_env
from text_env.core import resolve_reward
from text_env.models import DEFAULT_MODEL, load_tokenizer, resolve_model
from text_env.prompts import Example, load_examples
from text_env.tasks import get_task

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "Candidate",
    "Comparison",
    "bootstrap_interval",
    "compare_models",
    "describe_model",
    "paired_bootstrap_interval",
]

BOOTSTRAP_RESAMPLES = 2000  # prompt resamples per interval
CORPUS = ("distinct_1", "distinct_2")
"""Figures of the whole set of completions, shown without an interval: a resample repeats prompts, and a repeated
completion's n-grams count as repeats, so the bootstrap would measure the resampling, not the model."""
LEVEL = 0.95


# --- the models ----------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A model to evaluate, described without loading it: what it is and the settings its env is built with.

    :param spec: the name it was given (a run directory, a model directory, ``default`` or a hub id).
    :param kind: ``"run"`` (a saved run of any engine), ``"sft"`` (a ``textgen sft`` run) or ``"model"``.
    :param config: the env's settings: a run's own (lengths, envs, reward model, bf16); defaults for a model.
    :param base: the base LM whose tokenizer the model reads and writes (and its KL reference by default).
    """

    spec: str
    kind: str
    config: TrainConfig
    base: str

    def load_policy(self, env: Any) -> Any:
        """The SB3 policy (a ``CausalLMPolicy``, or a baseline's) that samples, loaded now."""
        if self.kind == "run":
            from agents.inspection import load_run

            return load_run(self.spec).policy.policy
        from agents.policies import CausalLMPolicy

        model = self.spec if self.kind == "model" else str(Path(self.spec) / "model")
        space = (env.observation_space, env.action_space)
        return CausalLMPolicy(*space, lambda _: 0.0, model=model, bf16=self.config.bf16)


def describe_model(spec: str) -> Candidate:
    """What ``spec`` names, checked without loading weights: a saved run, an SFT run, a model directory (its
    ``config.json``), ``default`` or a hub id.

    :raises FileNotFoundError: a directory that holds neither a run nor a model.
    :raises text_env.models.ModelLoadError: a name that is neither a directory nor a hub id.
    """
    from agents.inspection import is_saved_run

    path = Path(spec)
    if path.is_dir():
        record_file = path / "config.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        if isinstance(record, dict) and record.get("command") == "sft":
            if not (path / "model" / "config.json").is_file():
                raise FileNotFoundError(f"{spec} is a textgen sft run with no model yet (model/ is missing)")
            return Candidate(spec, "sft", _config_of(record, model=str(path / "model")), str(path / "model"))
        if is_saved_run(path):
            from agents.inspection import load_run_config

            config = load_run_config(path)
            return Candidate(spec, "run", config, config.model)
        if record_file.is_file() and "model_type" in record:
            return Candidate(spec, "model", TrainConfig(model=spec), spec)
        raise FileNotFoundError(
            f"{spec} holds no model: expected a run directory (config.json and model.zip, or checkpoint/; a textgen "
            "sft run's model/) or a model saved with save_pretrained (config.json and weights)"
        )
    if spec.lower() != DEFAULT_MODEL:
        resolve_model(spec)  # a path that is not there fails here, not after minutes of sampling
    return Candidate(spec, "model", TrainConfig(model=spec), spec)


def _config_of(record: dict[str, Any], **overrides: Any) -> TrainConfig:
    """A TrainConfig of the fields of ``record`` that are TrainConfig's."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in record.items() if k in names}, **overrides})


# --- bootstrap -----------------------------------------------------------------------------------------------------
def _resamples(n: int, seed: int, resamples: int) -> np.ndarray:
    """``(resamples, n)`` prompt indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], n: int, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """``statistic`` over all ``n`` prompts, and the percentile bootstrap interval of it (``LEVEL``) over
    ``resamples`` resamples of the prompts.

    :param statistic: a function of an index array of prompts (e.g. ``lambda idx: gold[idx].mean()``).
    """
    values = np.array([statistic(idx) for idx in _resamples(n, seed, resamples)])
    low, high = np.percentile(values, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(statistic(np.arange(n))), float(low), float(high)


def paired_bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    baseline: Callable[[np.ndarray], float],
    n: int,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float, float]:
    """The difference ``statistic - baseline`` of two models on the same ``n`` prompts, and its paired bootstrap
    interval: both are computed on the same resampled prompts, so what the prompts share cancels."""
    return bootstrap_interval(lambda idx: statistic(idx) - baseline(idx), n, seed, resamples)


# --- per-prompt scores ---------------------------------------------------------------------------------------------
@dataclass
class Scores:
    """One model's per-prompt figures over ``K`` samples each (arrays ``(N, K)``; completions ``[N][K]``)."""

    completions: list[list[str]]
    columns: dict[str, np.ndarray]  # per-sample metrics: reward_model_score, gold_score, kl, bleu, ...
    ref_log_prob: np.ndarray  # summed over each completion's tokens
    n_tokens: np.ndarray

    def pick(self, choice: np.ndarray) -> Scores:
        """One sample per prompt: ``choice[i]`` of prompt ``i`` (best-of-K)."""
        rows = np.arange(len(choice))
        one = {k: v[rows, choice][:, None] for k, v in self.columns.items()}
        return Scores(
            [[c[j]] for c, j in zip(self.completions, choice, strict=True)], one,
            self.ref_log_prob[rows, choice][:, None], self.n_tokens[rows, choice][:, None],
        )  # fmt: skip


def _statistics(scores: Scores) -> dict[str, Callable[[np.ndarray], float]]:
    """Each reported metric as a function of a prompt index array: per-sample means, perplexity (a ratio of sums
    over the resampled prompts) and distinct-n (corpus-level: see :data:`CORPUS`)."""
    stats: dict[str, Callable[[np.ndarray], float]] = {
        name: (lambda idx, v=values: float(v[idx].mean())) for name, values in scores.columns.items()
    }
    stats["perplexity"] = lambda idx: float(
        math.exp(-scores.ref_log_prob[idx].sum() / max(1, scores.n_tokens[idx].sum()))
    )
    for n in (1, 2):
        stats[f"distinct_{n}"] = lambda idx, n=n: distinct_n([c for i in idx for c in scores.completions[i]], n)
    stats["length"] = lambda idx: float(scores.n_tokens[idx].mean())
    return stats


def _reference_metrics(completions: Sequence[str], examples: Sequence[Example]) -> dict[str, np.ndarray]:
    """Per-completion BLEU, chrF (sacrebleu) and ROUGE-1/2/L F1 (rouge-score), the best over each prompt's
    references, 0-100; empty when no prompt has references."""
    if not all(e.references for e in examples):
        return {}
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(effective_order=True), CHRF()
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows = []
    for text, example in zip(completions, examples, strict=True):
        refs = list(example.references)
        best = {k: max(rouge.score(r, text)[k].fmeasure for r in refs) for k in ("rouge1", "rouge2", "rougeL")}
        rows.append([bleu.sentence_score(text, refs).score, chrf.sentence_score(text, refs).score,
                     *(100 * best[k] for k in ("rouge1", "rouge2", "rougeL"))])  # fmt: skip
    table = np.array(rows)
    return {name: table[:, j] for j, name in enumerate(("bleu", "chrf", "rouge1", "rouge2", "rougeL"))}


# --- the comparison ------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Rows of ``(model, aggregation)`` with each metric's mean and intervals; :meth:`markdown` and :meth:`record`."""

    rows: list[dict[str, Any]]
    metrics: list[str]
    settings: dict[str, Any]
    examples: list[Example] = field(default_factory=list)  # the prompts, in order
    completions: dict[str, list[str]] = field(default_factory=dict)  # model -> its (first) completion of each prompt
    per_sample: dict[str, dict[str, Any]] = field(default_factory=dict)  # with K > 1 samples: model -> arrays [N][K]

    def markdown(self) -> str:
        head = "| model | " + " | ".join(_LABELS.get(m, m) for m in self.metrics) + " |"
        lines = [head, "|---" * (len(self.metrics) + 1) + "|"]
        for row in self.rows:
            cells = []
            for m in self.metrics:
                mean, low, high = row["metrics"][m]
                cell = f"{mean:.3f}" if m in CORPUS else f"{mean:.3f} [{low:.3f}, {high:.3f}]"
                if m in CORPUS and m in row.get("difference", {}):
                    cell += f"<br>Δ {row['difference'][m][0]:+.3f}"
                elif m in row.get("difference", {}):
                    d, dl, dh = row["difference"][m]
                    cell += f"<br>Δ {d:+.3f} [{dl:+.3f}, {dh:+.3f}]"
                cells.append(cell)
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        note = (
            f"\n{self.settings['n_prompts']} prompts ({self.settings['data']}), seed {self.settings['seed']}, "
            f"{self.settings['samples']} sample(s) each; mean [95 % bootstrap interval over prompts; none for "
            f"distinct-n, a figure of the whole set]; Δ: the "
            f"difference from the first row, with a paired bootstrap interval (the same resampled prompts). KL and "
            f"perplexity against {self.settings['reference']}; reward model: {self.settings['reward_model']}."
        )
        return "\n".join(lines) + "\n" + note

    def record(self) -> dict[str, Any]:
        samples = [{"prompt": e.prompt, **{m: c[i] for m, c in self.completions.items()}}
                   for i, e in enumerate(self.examples)]  # fmt: skip
        record = {"settings": self.settings, "metrics": self.metrics, "rows": self.rows, "samples": samples}
        return record | ({"per_sample": self.per_sample} if self.per_sample else {})


_LABELS = {
    "reward_model_score": "reward model", "gold_score": "gold", "kl": "KL (nats)", "pass_at_1": "pass@1",
    "bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
    "perplexity": "perplexity", "distinct_1": "distinct-1", "distinct_2": "distinct-2", "length": "length",
}  # fmt: skip


def compare_models(
    models: Sequence[str],
    task: str | None = None,
    prompts: str | None = None,
    reference_column: str | None = None,
    n_prompts: int | None = None,
    samples: int = 1,
    seed: int = 0,
    reference: str | None = None,
    reward_model: str | None = None,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
) -> Comparison:
    """Sample every model on the same prompts and compare them (see the module docstring).

    Everything that can be checked without weights is checked first: each model's name, the data (an unknown
    column, an empty file), and that every model shares the KL reference's tokenizer.

    :param task: the task whose gold scorer, reward model and held-out prompts are used (default: the first run's
        task, else ``positive-review``).
    :param prompts: a ``.jsonl``/``.txt`` file (or ``hf:NAME``) of prompts to use instead of the task's eval split.
    :param n_prompts: the first N prompts (default: the first run's ``eval_prompts``, else 80; all, if fewer).
    :param samples: completions per prompt; above 1 the table has best-of-K and mean-of-K rows.
    :param reference: the LM that KL and perplexity are measured against (default: the first model's base).
    :param reward_model: a reward-model directory or ``gold`` (default: the first run's, else the task's).
    """
    if not models:
        raise ValueError("give at least one model to evaluate")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    candidates = [describe_model(spec) for spec in models]
    first_run = next((c for c in candidates if c.kind == "run"), None)
    task_name = task or (first_run.config.task if first_run else "positive-review")
    built = get_task(task_name)
    examples = load_examples(prompts, reference_column=reference_column) if prompts else built.examples("eval")
    count = n_prompts or (first_run.config.eval_prompts if first_run else 80)
    if count < 1:
        raise ValueError(f"n_prompts must be at least 1, got {count}")
    examples = list(examples[:count])
    built = replace(built, eval_prompts=examples)
    reference = reference or candidates[0].base
    _check_tokenizers(candidates, reference)
    reward_source = reward_model or (first_run.config.reward_model if first_run else None)
    composite = first_run.config.reward if first_run and reward_model is None else None  # the run's own sum
    reward = resolve_reward(reward_source, built, first_run.config.reward_kwargs if first_run else None, composite)

    per_model: list[tuple[str, Scores]] = []
    timing: dict[str, dict[str, float]] = {}
    for candidate in candidates:
        config = candidate.config
        if candidate.kind != "run" and first_run is not None:  # a plain model samples as the run it is compared with
            # init=None: beside a run from an SFT model (--init), the run's init would set the model to the SFT one
            config = replace(first_run.config, model=config.model, init=None, algo="ppo", lora_r=0, train_layers=None)
        config = replace(
            config, task=task_name, prompts=None, reference_column=None,
            max_new_tokens=max_new_tokens or config.max_new_tokens,
            max_prompt_tokens=max_prompt_tokens or config.max_prompt_tokens,
        )  # fmt: skip
        env = make_env(config, "eval", reward, seed=seed, task=built)
        try:
            policy = candidate.load_policy(env)
            own = resolve_model(reference) == resolve_model(candidate.base) and hasattr(policy, "reference_log_prob")
            started, runs = time.perf_counter(), []
            for k in range(samples):
                runs.append(evaluate(policy, env, examples, seed=seed + k, reference=None if own else reference))
            seconds = time.perf_counter() - started
        finally:
            env.close()
        scores = _scores(runs, examples, built.gold)
        tokens = float(scores.n_tokens.sum())
        timing[candidate.spec] = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds}
        per_model.append((candidate.spec, scores))
        del policy

    settings = {
        "models": list(models), "task": task_name, "data": prompts or f"{task_name} eval split",
        "n_prompts": len(examples), "samples": samples, "seed": seed, "reference": reference,
        "reward_model": reward_source or built.reward_model or "gold", "timing": timing,
    }  # fmt: skip
    return _table(per_model, samples, settings, examples, seed)


def _check_tokenizers(candidates: Sequence[Candidate], reference: str) -> None:
    """Every model reads and writes the KL reference's tokens (the tokenizers load; no weights do)."""
    vocab = load_tokenizer(reference).get_vocab()
    for candidate in candidates:
        if load_tokenizer(candidate.base).get_vocab() != vocab:
            raise ValueError(
                f"{candidate.spec} uses another tokenizer than the KL reference {reference!r}: KL and perplexity "
                "compare log-probabilities of the same tokens; give --reference a model of its tokenizer, or "
                "evaluate models of one tokenizer together"
            )


def _scores(runs: list[Evaluation], examples: Sequence[Example], gold: Any) -> Scores:
    """Per-prompt arrays ``(N, K)`` of ``K`` evaluations of the same prompts."""
    columns: dict[str, list[np.ndarray]] = {}
    for run in runs:
        per_sample = {"reward_model_score": run.reward_model_score, "gold_score": run.gold_score, "kl": run.kl}
        if hasattr(gold, "pass_at_1"):  # code: the problem is solved when every test passes
            per_sample["pass_at_1"] = (run.gold_score >= 1.0).astype(float)
        per_sample.update(_reference_metrics(run.completions, examples))
        for name, values in per_sample.items():
            columns.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
    return Scores(
        [list(texts) for texts in zip(*(run.completions for run in runs), strict=True)],
        {name: np.stack(values, axis=1) for name, values in columns.items()},
        np.stack([run.reference_log_prob for run in runs], axis=1), np.stack([run.n_tokens for run in runs], axis=1),
    )  # fmt: skip


def _interval(statistic: Callable[[np.ndarray], float], n: int, seed: int, metric: str) -> tuple[float, ...]:
    """``(value, low, high)``: the bootstrap interval, or for a corpus figure (:data:`CORPUS`) the value alone
    (``low`` and ``high`` NaN)."""
    if metric in CORPUS:
        return statistic(np.arange(n)), math.nan, math.nan
    return bootstrap_interval(statistic, n, seed)


def _difference(
    statistic: Callable[[np.ndarray], float], baseline: Callable[[np.ndarray], float], n: int, seed: int, metric: str
) -> tuple[float, ...]:
    """``(difference, low, high)``: the paired bootstrap interval, or for a corpus figure the difference alone."""
    if metric in CORPUS:
        return statistic(np.arange(n)) - baseline(np.arange(n)), math.nan, math.nan
    return paired_bootstrap_interval(statistic, baseline, n, seed)


def _mean_of(scores: Scores) -> Scores:
    """Mean over the K samples per prompt (corpus figures over every sample)."""
    return Scores(
        scores.completions, {k: v.mean(axis=1, keepdims=True) for k, v in scores.columns.items()},
        scores.ref_log_prob.sum(axis=1, keepdims=True), scores.n_tokens.sum(axis=1, keepdims=True),
    )  # fmt: skip


def _table(
    per_model: list[tuple[str, Scores]], samples: int, settings: dict[str, Any], examples: Sequence[Example], seed: int
) -> Comparison:
    views: list[tuple[str, Scores]] = []
    for name, scores in per_model:
        if samples == 1:
            views.append((name, scores))
        else:
            best = scores.pick(scores.columns["reward_model_score"].argmax(axis=1))
            views += [(f"{name} (best of {samples})", best), (f"{name} (mean of {samples})", _mean_of(scores))]
    metrics = list(_statistics(views[0][1]))
    n = len(examples)
    baselines: dict[str, dict[str, Callable[[np.ndarray], float]]] = {}
    rows = []
    for name, scores in views:
        stats = _statistics(scores)
        aggregation = name.rsplit(" (", 1)[1] if name.endswith(")") and samples > 1 else ""
        row: dict[str, Any] = {"name": name, "metrics": {m: _interval(stats[m], n, seed, m) for m in metrics}}
        if aggregation in baselines:  # against the first model under the same aggregation
            row["difference"] = {m: _difference(stats[m], baselines[aggregation][m], n, seed, m) for m in metrics}
        else:
            baselines[aggregation] = stats
        rows.append(row)
    completions = {name: [texts[0] for texts in s.completions] for name, s in per_model}
    per_sample = {  # every sample, so that the spread within and between prompts can be read (K = 1: the rows)
        name: {"completions": s.completions, **{k: v.tolist() for k, v in s.columns.items()}}
        for name, s in per_model
        if samples > 1
    }
    return Comparison(rows, metrics, settings, list(examples), completions, per_sample)


def save_comparison(comparison: Comparison, out: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` and ``report.json`` into a new directory under ``out``; return it."""
    from agents.train import json_safe, new_run_dir

    run_dir = new_run_dir(out, f"evaluate-{comparison.settings['task']}")
    (run_dir / "report.md").write_text(comparison.markdown() + "\n")
    (run_dir / "report.json").write_text(json.dumps(json_safe(comparison.record()), indent=1) + "\n")
    return run_dir
