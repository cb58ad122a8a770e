"""The benchmark scripts run end to end on tiny settings: compare_algorithms.py --quick gives every method a row
with every metric and draws the plots; rollout_and_update.py measures every figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from text_env.tasks import list_tasks

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_benchmark(name: str = "compare_algorithms"):  # type: ignore[no-untyped-def]  (a script, not a package)
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  (its dataclass looks itself up there)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_quick_mode_produces_every_row(tmp_path: Path) -> None:
    bench = load_benchmark()
    bench.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    assert list(result["summary"]) == list(bench.METHODS)
    if importlib.util.find_spec("trl") is None:  # an optional extra: its row must say so
        assert result["summary"].pop("trl_grpo")["errors"][0][0].startswith("skipped: trl is not installed")
    for method, row in result["summary"].items():
        assert row["errors"] == [] and row["seeds"] == 2, method
        for key in (*bench.METRICS, "train_seconds", "steps_per_second"):
            mean, std = row[key]
            assert mean == mean and std >= 0, (method, key)  # not NaN
    learners = bench.LM_LEARNERS + bench.PRIORLESS_LEARNERS
    assert all(run["curve"] for run in result["runs"] if run["method"] in learners)
    assert result["summary"]["base_lm"]["kl"][0] == pytest.approx(0.0, abs=1e-3)  # the reference itself
    assert result["summary"]["best_of_4"]["kl"][0] == pytest.approx(1.386 - 0.75, abs=1e-3)
    table = (tmp_path / "compare_algorithms_quick.md").read_text()
    assert all(bench.LABELS[m] in table for m in bench.METHODS) and "--quick" in table
    assert (tmp_path / "compare_algorithms_quick_curves.png").stat().st_size > 10_000
    assert (tmp_path / "compare_algorithms_quick_frontier.png").stat().st_size > 10_000


@pytest.mark.parametrize("task", [t for t in list_tasks() if t != "positive-review"])
def test_quick_mode_runs_every_method_on_every_task(tmp_path: Path, task: str) -> None:
    """`compare_algorithms.py --quick --task X`: every method trains and is judged by X's gold, references and all
    (one seed: the seeds' aggregation is test_quick_mode_produces_every_row's). On the long-prompt tasks PPO is the
    one LM learner: A2C, TRPO and MaskablePPO run the same CausalLMPolicy passes over the ~1000-token slots, where
    their costs are their own (TRPO's second-order passes took 211 s of the 290 s of summarize-docstring's run;
    MaskablePPO's 18 s and A2C's 8 s of its 68 s, on one AVX2 core), and test_quick_mode_produces_every_row trains
    each of them."""
    from text_env.tasks import get_task

    bench = load_benchmark()
    long_prompts = get_task(task).max_prompt_tokens > 256
    methods = [m for m in bench.METHODS if not (long_prompts and m in bench.LM_LEARNERS and m != "ppo")]
    bench.main(["--quick", "--task", task, "--seeds", "1", "--methods", ",".join(methods), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "compare_algorithms_quick.json").read_text())
    if importlib.util.find_spec("trl") is None:
        result["summary"].pop("trl_grpo")
    assert {m: row["errors"] for m, row in result["summary"].items() if row["errors"]} == {}
    assert all(row["gold_score"][0] == row["gold_score"][0] for row in result["summary"].values())  # not NaN
    assert f"Task `{task}`" in (tmp_path / "compare_algorithms_quick.md").read_text()


def test_unknown_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_benchmark().main(["--quick", "--methods", "ppo,sac", "--out", str(tmp_path)])


def test_resume_keeps_finished_runs(tmp_path: Path) -> None:
    bench = load_benchmark()
    first = bench.main(["--quick", "--methods", "random", "--seeds", "1", "--out", str(tmp_path)])
    second = bench.main(["--quick", "--methods", "random,base_lm", "--seeds", "1", "--out", str(tmp_path), "--resume"])
    assert [r["method"] for r in second["runs"]] == ["random", "base_lm"]
    assert second["runs"][0] == first["runs"][0]  # reused, not re-run


def test_bf16_default_times_both_dtypes(tmp_path: Path) -> None:
    """bf16_default.py --quick: every pass timed in both dtypes, the ratio their quotient, and the table says which
    default this machine gets (whatever the CPU: the figures are measured, the default is native_bf16's)."""
    from text_env.models import native_bf16

    result = load_benchmark("bf16_default").main(["--quick", "--out", str(tmp_path)])
    assert set(result["passes"]) == {"forward", "forward_backward", "matmul"}
    for row in result["passes"].values():
        assert row["float32_s"] > 0 and row["bf16_s"] > 0
        assert row["bf16_over_float32"] == pytest.approx(row["bf16_s"] / row["float32_s"])
    table = (tmp_path / "bf16_default_quick.md").read_text()
    assert f"**{'on' if native_bf16() else 'off'}** by default" in table and "| forward + backward |" in table


def test_rollout_and_update_measures_every_figure(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("rollout_and_update")
    out = tmp_path / "speed.json"
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--max-prompt-tokens", "128", "--n-envs", "2",
            "--tokens", "4"]  # fmt: skip
    bench.main([*tiny, "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    for config in bench.CONFIGS:  # textgen train's LoRA default and full fine-tuning
        keys = ["rollout_tok_s", "generate_tok_s", "rollout_vs_generate"]
        keys += [f"{k}_{t}" for k in ("update_epoch_s", "floor_s", "update_vs_floor") for t in ("T", "2T")]
        for key in keys:
            assert result[f"{config}_{key}"] > 0, (config, key)
        ratio = result[f"{config}_rollout_tok_s"] / result[f"{config}_generate_tok_s"]
        assert result[f"{config}_rollout_vs_generate"] == pytest.approx(ratio)
    assert result["lora_rollout_vs_generate_merged"] > 0
    profiles = result["profiles"]
    for phase in ("rollout, lora", "rollout, full", "update epoch, lora, T", "update epoch, full, T"):
        assert all(v == v for v in profiles[phase].values()), phase  # not NaN
    assert profiles["rollout, lora"]["KL reference pass over the episodes"] > 0
    assert profiles["update epoch, lora, T"]["backward"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| lora_rollout_vs_generate |" in table and "### Where the time goes: rollout, lora" in table


def test_trl_comparison_measures_every_method(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    bench = load_benchmark("trl_comparison")
    out = tmp_path / "trl.json"
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--max-prompt-tokens", "128", "--n-envs", "4",
            "--n-steps", "4", "--batch-size", "8", "--n-epochs", "2", "--generations", "2", "--no-bf16"]  # fmt: skip
    bench.main([*tiny, "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["methods"]) == list(bench.METHODS)
    for method, row in result["methods"].items():
        for key in ("seconds", "tokens", "tok_s", "sampling_s", "training_s", "reward_s", "textgen_speedup"):
            assert row[key] > 0, (method, key)
        assert row["optimizer_steps"] == 4  # 1 update x 2 epochs x 2 minibatches, for every method
    assert result["methods"]["textgen_ppo"]["tokens"] == 16  # 4 envs x 4 steps, every one trained on
    assert len(result["repeats"]) == 1 and result["methods"]["trl_grpo"]["textgen_speedup_worst"] > 0
    assert "| trl_rloo |" in out.with_suffix(".md").read_text()


def test_evaluate_speed_times_evaluation_against_generate(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("evaluate_speed")
    out = tmp_path / "evaluate_speed.json"
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--max-prompt-tokens", "128", "--n-envs", "2",
            "--tokens", "4"]  # fmt: skip
    bench.main([*tiny, "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    for config in bench.CONFIGS:  # a LoRA run's policy and the plain model
        assert result[f"{config}_evaluate_tok_s"] > 0 and result[f"{config}_generate_tok_s"] > 0
        ratio = result[f"{config}_evaluate_tok_s"] / result[f"{config}_generate_tok_s"]
        assert result[f"{config}_evaluate_vs_generate"] == pytest.approx(ratio)
    assert "| lora |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", ["trl_comparison", "rollout_and_update", "attention_kernel", "evaluate_speed"])
def test_zero_repeats_is_a_usage_error(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # refused before any model loads
        load_benchmark(name).main(["--repeats", "0", "--out", str(tmp_path / "out.json")])
    assert exited.value.code == 2 and "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_trl_comparison_rotates_the_order_and_reports_medians_and_the_worst(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    bench = load_benchmark("trl_comparison")
    out = tmp_path / "trl.json"
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--max-prompt-tokens", "128", "--n-envs", "2",
            "--n-steps", "2", "--batch-size", "4", "--n-epochs", "1", "--generations", "2", "--no-bf16"]  # fmt: skip
    bench.main([*tiny, "--methods", "textgen_ppo,trl_grpo", "--updates", "1", "--repeats", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [list(rows) for rows in result["repeats"]] == [["textgen_ppo", "trl_grpo"], ["trl_grpo", "textgen_ppo"]]
    speedups = [rows["trl_grpo"]["textgen_speedup"] for rows in result["repeats"]]
    grpo = result["methods"]["trl_grpo"]
    assert grpo["textgen_speedup"] == pytest.approx(sum(speedups) / 2)  # the median of two
    assert grpo["textgen_speedup_worst"] == min(speedups)


def test_textgen_train_seeds_reports_mean_and_worst(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("textgen_train_seeds")
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--total-timesteps", "32", "--n-envs", "2",
            "--n-steps", "16", "--batch-size", "16", "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "4",
            "--max-prompt-tokens", "128"]  # fmt: skip
    bench.main(["--seeds", "2", "--out", str(tmp_path), "--name", "seeds", "--", *tiny])
    reports = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["config"]["seed"] for r in reports] == [0, 1]
    table = (tmp_path / "seeds.md").read_text()
    assert "| **mean** |" in table and "| **worst** |" in table and "--seeds 2" in table
    assert (tmp_path / "seeds.png").stat().st_size > 10_000


def test_rlhf_loop_compares_with_one_shot_train_and_best_of_16(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("rlhf_loop")
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--n-envs", "2", "--n-steps", "4", "--batch-size",
            "8", "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "4",
            "--max-prompt-tokens", "128"]  # fmt: skip
    budget = ["--rounds", "2", "--tokens-per-round", "16", "--pairs-per-round", "4"]
    argv = ["--seeds", "2", *budget, "--runs", str(tmp_path / "runs"), "--out", str(tmp_path), "--name", "loop"]
    first = bench.main([*argv, "--", *tiny])
    seeds = json.loads((tmp_path / "loop.json").read_text())["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1] and all(set(s) == {"seed", *bench.METHODS} for s in seeds)
    for s in seeds:
        assert [r["round"] for r in s["rlhf"]["rounds"]] == [0, 1, 2]
        assert s["train"]["config"]["total_timesteps"] == 32  # the loop's PPO tokens, at once
        assert s["best_of_16"]["method"] == "best_of_16" and s["best_of_16"]["seed"] == s["seed"]
    table = (tmp_path / "loop.md").read_text()
    assert "| **mean** |" in table and "| **worst** |" in table and "--seeds 2" in table and "## Targets" in table
    assert table.count("**met**") + table.count("**not met**") == 4  # every target judged
    assert (tmp_path / "loop.png").stat().st_size > 10_000
    again = bench.main([*argv, "--methods", "rlhf,train", "--", *tiny])  # finished runs are reused, not re-run
    assert [s["rlhf"] for s in again["seeds"]] == [s["rlhf"] for s in first["seeds"]]


def test_tasks_reports_gold_and_reference_metrics(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("tasks")
    tiny = ["--model", str(tiny_model), "--prompts", "2", "--n-envs", "2", "--max-new-tokens", "4", "--no-bf16"]
    tiny += ["--max-prompt-tokens", "200"]  # the tiny tokenizer splits finer than SmolLM2's
    results = bench.main(["--tasks", "positive-review,dialogue", *tiny, "--out", str(tmp_path)])
    review, dialogue = results
    assert set(bench.REFERENCE_METRICS).isdisjoint(review)  # VADER needs no references
    samples = dialogue["samples"]  # both prompts: the metrics are those of these completions
    expected = bench.reference_metrics([s["completion"] for s in samples], [s["references"] for s in samples])
    assert {k: dialogue[k] for k in bench.REFERENCE_METRICS} == pytest.approx(expected)
    assert all(0.0 <= dialogue[k] <= 100.0 for k in bench.REFERENCE_METRICS)
    assert dialogue["gold_mean"] == pytest.approx(sum(s["gold"] for s in samples) / 2) and dialogue["n_prompts"] == 2
    record = json.loads((tmp_path / "tasks.json").read_text())
    assert record["results"] == results and "--tasks positive-review,dialogue" in record["command"]
    assert "| dialogue | chrF (sacrebleu) | 2 (" in (tmp_path / "tasks.md").read_text()


def test_tasks_train_reports_gold_after_textgen_train(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--train runs `textgen train --task X` in its own process per task and tabulates before/after; a second
    call reuses the finished run."""
    bench = load_benchmark("tasks")
    tiny = ["--model", str(tiny_model), "--prompts", "2", "--n-envs", "2", "--max-new-tokens", "4", "--no-bf16"]
    tiny += ["--max-prompt-tokens", "200", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--train"]
    train = ["--reward-model", "gold", "--total-timesteps", "32", "--n-envs", "2", "--n-steps", "16", "--batch-size",
             "16", "--n-epochs", "1", "--eval-prompts", "2", "--no-bf16", "--max-new-tokens", "4",
             "--max-prompt-tokens", "200"]  # fmt: skip
    (result,) = bench.main(["--tasks", "dialogue", *tiny, "--", *train])
    trained = result["trained"]
    (report_file,) = (tmp_path / "runs").glob("*/dialogue/seed0/*/report.json")
    report = json.loads(report_file.read_text())
    scale = report["final_reward_scale"]  # --reward-scaling auto: the gold is scaled
    assert trained["reward"] == f"gold ÷ winsorised std ({scale:.3f})" and trained["eval_prompts"] == 2
    assert trained["total_timesteps"] == 32 and not trained["peak_rss_upper_bound"]
    assert trained["gold_after"] == report["after"]["gold_score"] and trained["kl"] == report["after"]["kl"]
    row = f"| dialogue | gold ÷ winsorised std ({scale:.3f}) | 2 | {trained['gold_before']:.3f} |"
    assert f"{row} {trained['gold_after']:.3f} |" in (tmp_path / "tasks.md").read_text()
    seeds = sys.modules["textgen_train_seeds"]  # run_seed's module: it reads a finished run back
    monkeypatch.setattr(seeds.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was run again"))
    (again,) = bench.main(["--tasks", "dialogue", *tiny, "--", *train])
    assert again["trained"] == trained


def test_reward_model_data_fits_a_curve_per_feature_set(tiny_model: Path, tmp_path: Path) -> None:
    """reward_model_data.py: a head per train size and feature set, each measured on the same test split."""
    from text_env.rewards.preferences import PreferencePair, append_pairs

    words = ["good", "great", "bad", "awful", "fine", "dull"]
    pairs = [PreferencePair("the movie was", f" {words[i % 2]} {i}", f" {words[2 + i % 2]} {i}") for i in range(40)]
    append_pairs(tmp_path / "p.jsonl", pairs)
    bench = load_benchmark("reward_model_data")
    result = bench.main(["--data", str(tmp_path / "p.jsonl"), "--backbone", str(tiny_model), "--layers", "1,2",
                         "--sizes", "10", "--out", str(tmp_path / "out")])  # fmt: skip
    assert result["split"] == {"train": 28, "validation": 4, "test": 8, "seed": 0}
    assert [(r["features"], r["train_pairs"]) for r in result["rows"]] == [
        ("block 2", 10), ("block 2", 28), ("blocks 1 + 2", 10), ("blocks 1 + 2", 28)]  # fmt: skip
    assert all(r["test"]["gold_accuracy"] == r["test"]["gold_accuracy"] for r in result["rows"])  # not NaN
    assert "| blocks 1 + 2 | 28 |" in (tmp_path / "out.md").read_text()


def test_attention_kernel_times_both_kernels(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("attention_kernel")
    out = tmp_path / "attention"
    tiny = ["--model", str(tiny_model), "--reward-model", "gold", "--max-prompt-tokens", "128", "--n-envs", "2"]
    result = bench.main([*tiny, "--repeats", "1", "--out", str(out)])
    assert set(result["arms"]) == set(bench.ARMS)
    assert all(row["epoch_s"] > 0 and row["rss_rise_gb"] >= 0 for row in result["arms"].values())
    assert result["longest_episode_tokens"] > 0 and result["math_vs_chosen_time"] > 0
    assert "| math (TRPO's) |" in out.with_suffix(".md").read_text()


def test_benchmark_runs_resume_an_interrupted_run_and_reuse_a_finished_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every benchmark runs textgen through ``run_textgen``: a finished run is read back, an interrupted one resumed."""
    bench = load_benchmark("textgen_train_seeds")
    calls: list[list[str]] = []

    def textgen(command: list[str], check: bool) -> None:  # stands in for the process: it finishes the run
        calls.append(command[3:])
        run_dir = Path(command[-1]) if "--resume" in command else Path(command[-1]) / "sft-dialogue-1"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps({"run_dir": str(run_dir)}))

    monkeypatch.setattr(bench.subprocess, "run", textgen)
    fresh = bench.run_textgen("sft", tmp_path / "fresh", ["--task", "dialogue"])
    (tmp_path / "stopped" / "sft-dialogue-1").mkdir(parents=True)
    (tmp_path / "stopped" / "sft-dialogue-1" / "config.json").write_text("{}")
    resumed = bench.run_textgen("sft", tmp_path / "stopped", ["--task", "dialogue"])
    assert bench.run_textgen("sft", tmp_path / "stopped", ["--task", "dialogue"]) == resumed  # read back, not run
    assert calls == [
        ["sft", "--task", "dialogue", "--out", str(tmp_path / "fresh")],
        ["sft", "--resume", str(tmp_path / "stopped" / "sft-dialogue-1")],
    ]
    assert fresh["run_dir"] == str(tmp_path / "fresh" / "sft-dialogue-1")


def test_sft_loss_memory_quick_measures_both_losses(tiny_model: Path, tmp_path: Path) -> None:
    bench = load_benchmark("sft_loss_memory")
    results = bench.main(["--quick", "--model", str(tiny_model), "--out", str(tmp_path)])
    stock, ours = results["rows"]
    assert (stock["loss"], ours["loss"]) == ("stock", "reference") and stock["peak_rise_gb"] > 0
    assert ours["loss_value"] == pytest.approx(stock["loss_value"], rel=1e-5)
    assert "| quick | 8 x (24 + 8) | reference |" in (tmp_path / "sft_loss_memory_quick.md").read_text()


def test_supervised_rl_table_only_tables_the_kept_seeds_of_each_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--table-only runs nothing: it tables each task's kept seeds (here dialogue's 0 and 2, none of code) and says
    so in one line where no task has any."""
    bench = load_benchmark("supervised_rl")
    argv = ["--tasks", "dialogue,code", "--table-only", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert "--table-only: no kept rows of dialogue, code under" in capsys.readouterr().err
    kept = Path(__file__).parents[1] / "benchmarks" / "results" / "supervised_rl_rows" / "dialogue"
    (tmp_path / "supervised_rl_rows" / "dialogue").mkdir(parents=True)
    for seed in (0, 2):
        (tmp_path / "supervised_rl_rows" / "dialogue" / f"seed{seed}.json").write_text(
            (kept / f"seed{seed}.json").read_text()
        )
    results = bench.main(argv)
    assert list(results) == ["dialogue"] and [s["seed"] for s in results["dialogue"]["SFT + PPO"]] == [0, 2]
    assert "| dialogue | SFT + PPO | 2 |" in (tmp_path / "supervised_rl.md").read_text()


def test_supervised_rl_quick_runs_every_row(tmp_path: Path) -> None:
    """`supervised_rl.py --quick`: base, PPO, SFT and SFT + PPO on dialogue, each a run of the project's commands;
    SFT lowers the perplexity of the held-out references, and SFT + PPO is leashed to the SFT model."""
    bench = load_benchmark("supervised_rl")
    results = bench.main(["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "runs")])
    rows = results["dialogue"]
    assert list(rows) == ["base", "PPO", "SFT", "SFT + PPO"] and all(len(seeds) == 1 for seeds in rows.values())
    assert rows["SFT"][0]["perplexity"] < rows["base"][0]["perplexity"]
    (both,) = (tmp_path / "runs" / "dialogue" / "sft_ppo" / "seed0").glob("*/report.json")
    (sft_run,) = (tmp_path / "runs" / "dialogue" / "sft" / "seed0").iterdir()
    assert json.loads(both.read_text())["kl_reference"] == str(sft_run / "model")
    table = (tmp_path / "supervised_rl_quick.md").read_text()
    assert "| dialogue | SFT + PPO |" in table and (tmp_path / "supervised_rl_quick.png").stat().st_size > 5_000
    # each task and seed is kept beside the results with its machine, and read back where the runs are gone
    again = bench.main(["--quick", "--out", str(tmp_path), "--runs", str(tmp_path / "gone")])
    assert again == results and rows["PPO"][0]["machine"] and not (tmp_path / "gone" / "dialogue").exists()


def test_constrained_quick_runs_every_arm(tmp_path: Path) -> None:
    """benchmarks/constrained.py --quick on dialogue: the bounds measured on the train split, a tuned fixed weight and
    dual steps, and the four arms, each bound reported per run (λ held at 0 unconstrained, at the weight when fixed)."""
    bench = load_benchmark("constrained")
    arms = ",".join(bench.ARMS)  # plain-mean, an ablation, is trained only when named
    results = bench.main(["--quick", "--cases", "dialogue", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path),
                          "--arms", arms])  # fmt: skip
    case = results["dialogue"]
    assert [b.split(">=")[0].split("<=")[0] for b in case["bounds"]] == ["ref_logprob", "length", "length"]
    arms = [arm for arm in bench.ARMS if not arm.startswith("adaptive")]  # dialogue has no KL budget to steer β to
    assert [r["arm"] for r in case["rows"]] == arms
    assert case["tuned"] == {"fixed": 1.0, "plain-mean": 0.5, "constrained": 0.5}
    tuning = ["fixed w=1 (tuning)", "plain-mean lr=0.5 (tuning)", "constrained lr=0.5 (tuning)"]
    assert [r["arm"] for r in case["tuning"]] == tuning
    lambdas = {r["arm"]: [c["final_lambda"] for c in r["constraints"].values()] for r in case["rows"]}
    assert lambdas["unconstrained"] == [0.0] * 3 and lambdas["fixed"] == [1.0] * 3
    assert all(set(r["constraints"]) == set(case["bounds"]) for r in case["rows"])
    # the end of training is judged on the final policy's held-out completions
    assert all(where == "held out" for r in case["rows"] for _, where in r["final"].values())
    table = (tmp_path / "constrained_quick.md").read_text()
    assert "## dialogue" in table and "| constrained | 0 |" in table and (tmp_path / "constrained_quick.png").is_file()
    # every finished run's report is kept beside the results: the table comes back on a machine without the runs
    again = bench.main(["--quick", "--cases", "dialogue", "--runs", str(tmp_path / "gone"), "--out", str(tmp_path),
                        "--table-only"])  # fmt: skip
    assert [(r["arm"], r["gold_after"]) for r in again["dialogue"]["rows"]] == [
        (r["arm"], r["gold_after"]) for r in case["rows"]
    ] and not (tmp_path / "gone" / "dialogue").exists()
    # the dialogue bounds were measured once and kept: every later run trains against the same strings
    kept = json.loads((tmp_path / "constrained_quick_runs" / "dialogue" / "bounds.json").read_text())
    assert again["dialogue"]["bounds"] == case["bounds"] == kept["bounds"]


def test_constrained_bookkeeping_times_the_multipliers_against_a_default_rollout(tmp_path: Path) -> None:
    """--bookkeeping times Lagrangian.charge (the dual step and the charges) on a default rollout's arrays and
    relates it to the default runs' seconds per rollout (read from a textgen_train_seeds.json)."""
    runs = [{"train_seconds": 100.0, "config": {"n_envs": 16, "n_steps": 32, "total_timesteps": 1024}}]
    (tmp_path / "textgen_train_seeds.json").write_text(json.dumps(runs))
    result = load_benchmark("constrained").main(["--bookkeeping", "--out", str(tmp_path)])
    assert 0 < result["seconds_per_rollout"] < 1 and result["share_of_rollout"] == result["seconds_per_rollout"] / 50
    assert "50.0-50.0 s" in (tmp_path / "constrained_bookkeeping.md").read_text()


def test_constrained_throughput_times_rollouts_with_and_without_the_multipliers(tmp_path: Path) -> None:
    """--throughput --quick: one tiny run, every other rollout + update with the multipliers (on, off, off, on per
    pair), each timed; the ratio is the sums' and each pair's is reported."""
    result = load_benchmark("constrained").main(["--throughput", "2", "--quick", "--out", str(tmp_path)])
    on, off = result["constrained_seconds"], result["unconstrained_seconds"]
    assert len(on) == len(off) == 4 and min(on + off) > 0 and len(result["pair_ratios"]) == 2
    assert result["ratio"] == pytest.approx(sum(on) / sum(off)) and len(result["lambdas"]) == 2
    assert "Ratio with / without" in (tmp_path / "constrained_throughput_quick.md").read_text()


def test_frontier_fits_gaos_forms() -> None:
    """Both of Gao et al.'s forms are recovered from exact points: alpha, beta, the peak d* and R² = 1."""
    frontier = load_benchmark("frontier")
    kl = np.linspace(0.0, 16.0, 9)
    d = np.sqrt(kl)
    bon = frontier.fit_gao(kl, d * (0.5 - 0.1 * d), "bon")
    assert bon["alpha"] == pytest.approx(0.5) and bon["beta"] == pytest.approx(0.1) and bon["r2"] == pytest.approx(1)
    assert bon["d_star"] == pytest.approx(2.5)
    rl = frontier.fit_gao(kl, d * (0.3 - 0.2 * np.log(np.where(d > 0, d, 1))), "rl")
    assert rl["alpha"] == pytest.approx(0.3) and rl["beta"] == pytest.approx(0.2)
    assert rl["d_star"] == pytest.approx(np.exp(0.3 / 0.2 - 1)) and frontier.fitted_gain(rl, 4.0, "rl") == (
        pytest.approx(2 * (0.3 - 0.2 * np.log(2)))
    )


def test_best_of_n_on_a_pool_by_hand() -> None:
    """Pool [1, 2, 2, 3] (a tie), best of 2: P(group) = F^2 steps: 1/16, 8/16, 7/16; KL = sum P log(P / p)."""
    frontier = load_benchmark("frontier")
    chance, mean, kl = frontier.best_of_n(np.array([1.0, 2, 2, 3]), np.array([[10.0], [20], [40], [30]]), 2)
    assert chance == pytest.approx([1 / 16, 8 / 16, 7 / 16]) and mean[:, 0] == pytest.approx([10, 30, 30])
    p = np.array([0.25, 0.5, 0.25])
    assert kl == pytest.approx(float(chance @ np.log(chance / p))) and kl < np.log(2) - 1 / 2
    assert frontier.best_of_n(np.arange(4.0), np.zeros((4, 1)), 1)[2] == pytest.approx(0)


def test_frontier_does_not_extrapolate_below_a_methods_first_point() -> None:
    """NLPO's top-p mask alone moves the untrained policy (3.09 nats on positive-review): a budget or a common KL
    below every seed's lowest point reads "starts above" for it, not a value extrapolated through the origin."""
    frontier = load_benchmark("frontier")

    def cell(method: str, kls: list[float]) -> dict:
        return {"task": "t", "method": method, "seed": 0,
                "points": [{"kl": k, "gold_score": 0.2 + 0.05 * k, "train_seconds": k, "samples_per_answer": 1.0}
                           for k in kls]}  # fmt: skip

    summary = frontier.summarize([cell("ppo", [0.0, 1.0, 2.5]), cell("nlpo", [3.0, 6.0, 9.0])])["t"]
    assert set(summary["ppo"]["budgets"]) == {"2.0"} and set(summary["nlpo"]["budgets"]) == {"4.0", "8.0"}
    assert summary["nlpo"]["starts_at"] == 3.0 and summary["nlpo"]["common"] is None
    assert summary["ppo"]["common"]["kl"] == 2.5
    text = frontier.markdown({"t": summary}, [], "cmd", "here")
    assert "| nlpo | starts above |" in text and "Starting above it: nlpo (its lowest KL 3.00)." in text


def test_frontier_says_where_each_ppo_variant_matches_best_of_16() -> None:
    """Best-of-16 gains +0.4 here; a PPO variant that reaches it on its fitted curve gets the KL where it does, one
    that stops short says so with its highest KL, and a method that is not PPO gets no line."""
    frontier = load_benchmark("frontier")

    def cell(method: str, slope: float, kls: list[float]) -> dict:
        return {"task": "t", "method": method, "seed": 0,
                "points": [{"kl": k, "gold_score": 0.2 + slope * np.sqrt(k), "train_seconds": k,
                            "samples_per_answer": 1.0} for k in kls]}  # fmt: skip

    bon = {"task": "t", "method": "best_of_n", "seed": 0, "points": [
        {"kl": 0.0, "gold_score": 0.2, "n": 1, "train_seconds": 0.0, "samples_per_answer": 1.0},
        {"kl": 2.0, "gold_score": 0.6, "n": 16, "train_seconds": 0.0, "samples_per_answer": 16.0}]}  # fmt: skip
    results = [bon, cell("ppo", 0.1, [0.0, 1.0, 4.0]), cell("ppo_ref_ema", 0.2, [0.0, 4.0, 9.0]),
               cell("grpo", 0.5, [0.0, 1.0, 4.0])]  # fmt: skip
    lines = frontier.ppo_against_best_of_16(frontier.summarize(results)["t"], results, "t")
    assert len(lines) == 2 and "ppo's fitted gain does not reach best-of-16's (+0.400)" in lines[0]
    assert "within its highest measured KL (4.0 nats)" in lines[0]
    kl = float(lines[1].split(" at KL ")[1].split()[0])
    assert lines[1].startswith("- ppo_ref_ema matches best-of-16's gain (+0.400)")
    assert kl == pytest.approx(4.0, abs=0.05)


def test_frontier_refuses_a_negative_dpo_pair_count(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative --dpo-pairs would slice pairs off the end; it is refused in one line before anything runs."""
    frontier = load_benchmark("frontier")
    with pytest.raises(SystemExit):
        frontier.main(["--dpo-pairs", "-5"])
    assert "--dpo-pairs must be 0 (all pairs) or a positive count, got -5" in capsys.readouterr().err


def test_frontier_table_only_reads_every_kept_seed_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--table-only tables the kept cells with however many seeds each method has; with none it says so."""
    frontier = load_benchmark("frontier")
    argv = ["--tasks", "positive-review", "--methods", "best_of_n,grpo", "--table-only", "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        frontier.main(argv)
    assert "--table-only: no kept cells of best_of_n, grpo under" in capsys.readouterr().err
    kept = Path(__file__).parents[1] / "benchmarks" / "results" / "frontier_cells" / "positive-review"
    for method, seeds in (("best_of_n", (0,)), ("grpo", (0, 1))):
        (tmp_path / "frontier_cells" / "positive-review" / method).mkdir(parents=True)
        for seed in seeds:  # grpo's seed 0 cell again as seed 1: two seeds
            cell = json.loads((kept / method / "seed0.json").read_text())
            path = tmp_path / "frontier_cells" / "positive-review" / method / f"seed{seed}.json"
            path.write_text(json.dumps({**cell, "seed": seed}))
    frontier.main(argv)
    table = (tmp_path / "frontier.md").read_text()
    assert "| best_of_n | 1 | bon |" in table and "| grpo | 2 | rl |" in table


def test_frontier_quick_measures_every_method(tmp_path: Path) -> None:
    """--quick: every method (DPO at its beta, the PPO ablations) gives points with every metric and its cost,
    fitted; best-of-n's measured KL stays under its bound; the table, JSON and plot are written."""
    frontier = load_benchmark("frontier")
    frontier.main(["--quick", "--tasks", "positive-review", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "frontier_quick.json").read_text())
    methods = {run["method"] for run in result["runs"]}
    assert methods == {*frontier.METHODS, *frontier.ABLATIONS} - {"dpo"} | {"dpo_0.1"}
    for run in result["runs"]:
        assert len(run["points"]) >= 2, run["method"]  # before (or n = 1) and at least one more
        for point in run["points"]:
            assert all(np.isfinite(point[k]) for k in (*frontier.METRICS, "train_seconds", "tokens")), run["method"]
    (bon,) = [run for run in result["runs"] if run["method"] == "best_of_n"]
    assert [p["n"] for p in bon["points"]] == [1, 2, 4] and bon["points"][0]["kl"] == 0
    assert all(p["kl"] <= p["kl_bound"] + 1e-9 and p["samples_per_answer"] == p["n"] for p in bon["points"])
    assert set(result["summary"]["positive-review"]) == methods
    rows = result["summary"]["positive-review"].values()
    commons = {row["common"]["kl"] for row in rows if row["common"]}  # one KL where all that start below it compare
    assert len(commons) == 1 and commons.pop() >= 0
    assert all(run["machine"] and run["bf16"] is False for run in result["runs"])  # where each cell ran, and how
    assert "| ppo |" in (tmp_path / "frontier_quick.md").read_text() and (tmp_path / "frontier_quick.png").is_file()


def test_dialogue_gold_separates_length_from_content(tmp_path: Path) -> None:
    """dialogue_gold.py on a hand-made `textgen evaluate` report: a reference-long reply equal to a reference scores 1
    at every beta, its cut at k tokens scores less than the whole, and a report of another task is refused."""
    from text_env.tasks import get_task

    bench = load_benchmark("dialogue_gold")
    examples = get_task("dialogue").examples("eval")[:3]
    samples = [{"prompt": e.prompt, "default": e.references[0], "other": "no"} for e in examples]
    report = {"settings": {"models": ["default", "other"], "task": "dialogue", "data": "dialogue eval split",
                           "seed": 0}, "samples": samples}  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(report))
    result = bench.main([str(tmp_path), "--out", str(tmp_path / "out")])
    exact, other = result["models"]
    assert exact["chrf_beta2"] == exact["chrf_beta1"] == exact["chrf_beta0.5"] == pytest.approx(1.0)
    assert other["chrf_beta2"] < 0.5 and other["length"] == 1
    cuts = result["cut_first_model"]
    assert cuts["4"] < cuts["32"] == pytest.approx(1.0) and result["references_leave_one_out"]["prompts"] > 0
    assert "| other |" in (tmp_path / "out" / "dialogue_gold.md").read_text()
    # --spread: chrF 0.1 / 0.3 on one prompt, 0.5 / 0.7 on the other: variance 0.0667, within 0.02, 70 % between
    spread = {"settings": {"models": ["default"], "samples": 2, "data": "mine.jsonl"},
              "per_sample": {"default": {"chrf": [[10, 30], [50, 70]]}}}  # fmt: skip
    (tmp_path / "spread.json").write_text(json.dumps(spread))
    result = bench.main([str(tmp_path), "--spread", str(tmp_path / "spread.json"), "--out", str(tmp_path / "out")])
    assert result["spread"]["between_share"] == pytest.approx(0.7)
    assert result["spread"]["within_prompt"] == pytest.approx(0.02)
    assert "70% lies between prompts" in (tmp_path / "out" / "dialogue_gold.md").read_text()
    report["settings"]["task"] = "code"
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="dialogue task"):
        bench.main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_constrained_compares_adaptive_beta_at_the_constrained_runs_kl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adaptive β runs at ascending targets until its KL reaches the constrained run's, and its gold there is
    interpolated linearly in √KL between the bracketing points (hand computation: √4 lies halfway from √1 to √9,
    so gold 0.3 + (0.6 - 0.3) / 2 = 0.45; linear in KL it would be 0.3 + 0.3 * 3 / 8 = 0.4125)."""
    bench = load_benchmark("constrained")
    assert bench.gold_at_kl([(9.0, 0.6), (0.0, 0.1), (1.0, 0.3)], 4.0) == pytest.approx((0.45, 1.0, 9.0))
    assert bench.gold_at_kl([(0.0, 0.1), (1.0, 0.3)], 4.0) is None  # not reached: nothing extrapolated
    reports = {0.5: (1.0, 0.3), 1.0: (9.0, 0.6), 2.0: (16.0, 0.9)}  # target -> (held-out KL, gold)
    ran = []

    def run(out: Path, options: list[str], kept: Path, train: bool = True) -> dict:
        target = float(options[options.index("--target-kl") + 1])
        ran.append((str(out.relative_to("runs")), options[options.index("--constraint-lr") + 1]))
        kl, gold = reports[target]
        after = {"gold_score": gold, "kl": kl, "distinct_2": 0.9, "length": 8.0}
        return {"before": {"gold_score": 0.1}, "after": after, "config": {"total_timesteps": 64, "bf16": False},
                "train_seconds": 1.0, "history": []}  # fmt: skip

    monkeypatch.setattr(bench, "run", run)

    case = {"objective": [], "bounds": ["kl<=6"], "target_kl": 6.0}
    rows = [{"arm": "constrained", "seed": 1, "kl": 4.0, "gold_after": 0.5, "gold_before": 0.1}]
    (compared,), sweep = bench.equal_kl(case, rows, [2.0, 0.5, 1.0], Path("runs"), Path("kept"), [])
    # λ held at 0; seed 1's runs live under the sweep; target 2 is never run: target 1 already reached the KL
    assert ran == [("adaptive-sweep/seed1/target0.5", "0"), ("adaptive-sweep/seed1/target1", "0")]
    assert [r["arm"] for r in sweep] == ["adaptive target=0.5", "adaptive target=1"]
    assert compared["adaptive_gold"] == pytest.approx(0.45) and compared["bracket"] == (1.0, 9.0)
    assert "| mean of 1 | 4.00, 0.500 | | 0.450 | +0.050 |" in bench.equal_kl_markdown([compared])
    assert bench.sweep_path(0, 0.5) == Path("tuning/target0.5")  # seed 0's are the runs that tuned the target once
    # a tuned arm's seeds sit under their setting: one chosen anew never reads back seeds trained at another
    assert bench.run_path("constrained", 1, 0.2) == Path("constrained/lr0.2/seed1")
    assert bench.run_path("constrained", 0, 0.5) == Path("tuning/lr0.5") and bench.run_path(
        "adaptive", 2, None
    ) == Path("adaptive/seed2")
