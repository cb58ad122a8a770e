"""Constrained RLHF: bounds parsed (or refused in one line), multipliers charged and updated as computed by hand,
saved and restored exactly, and a tiny-model run held to a length bound that the unconstrained run breaks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agents.cli import main
from agents.constraints import Constraint, Lagrangian, episode_quantities, parse_constraints
from agents.evaluate import evaluate
from agents.run import TrainConfig, build_run
from agents.train import restore_checkpoint, train


def test_bounds_are_parsed() -> None:
    parsed = parse_constraints(["kl<=6", " distinct2 >= 0.85 ", "length<=20", "length>=2", "ref_logprob>=-2.5e0"], 32)
    assert parsed == [
        Constraint("kl", "<=", 6.0), Constraint("distinct2", ">=", 0.85), Constraint("length", "<=", 20.0),
        Constraint("length", ">=", 2.0), Constraint("ref_logprob", ">=", -2.5),
    ]  # fmt: skip
    assert [c.violation(v) for c, v in zip(parsed, (8.0, 0.8, 10.0, 1.0, -3.0), strict=False)] == pytest.approx(
        [2.0, 0.05, -10.0, 1.0, 0.5]
    )


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["klx<=3"], "unknown quantity 'klx'; allowed: kl, length, distinct2, ref_logprob"),
        (["kl<="], "is not NAME<=NUMBER or NAME>=NUMBER"),
        (["kl<>3"], "is not NAME<=NUMBER or NAME>=NUMBER"),
        (["kl=3"], "is not NAME<=NUMBER or NAME>=NUMBER"),
        (["kl<=-1"], "cannot hold: kl lies in [0, inf]"),
        (["distinct2>=1.5"], "cannot hold: distinct2 lies in [0, 1]"),
        (["ref_logprob>=0.5"], "cannot hold: ref_logprob lies in [-inf, 0]"),
        (["length>=40"], "cannot hold: length lies in [1, 32]"),
        (["length<=10", "length>=20"], "contradict: no length meets both"),
        (["kl<=3", "kl<=4"], "bound kl twice from the same side"),
    ],
)
def test_bad_bounds_are_one_line_before_any_model_loads(
    specs: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]*$") as refused:
        parse_constraints(specs, max_new_tokens=32)
    assert message in str(refused.value)
    flags = [arg for spec in specs for arg in ("--constraint", spec)]
    with pytest.raises(SystemExit) as exited:  # the default model is never fetched: the task's length is enough
        main(["train", *flags, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "runs")])
    assert exited.value.code == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_episode_quantities() -> None:
    got = episode_quantities(np.array([0.5, 0.25, 1.0]), np.array([-1.0, -2.0, -3.0]), [7, 8, 7, 8])
    assert got == {"kl": 1.75, "length": 4.0, "distinct2": pytest.approx(2 / 3), "ref_logprob": -2.0}


def test_charges_and_dual_step_match_a_hand_computation() -> None:
    """Two envs, four steps: env 0's episodes end at steps 1 and 3, env 1's at step 3 (after 4 tokens)."""
    lagrangian = Lagrangian(parse_constraints(["kl<=1", "length<=2"]), lr=0.5, initial=0.2)
    lagrangian.start(2)
    rewards = np.zeros((4, 2), dtype=np.float32)
    kl = np.array([[0.5, 0.1], [0.5, 0.1], [1.0, 0.1], [2.0, 0.1]], dtype=np.float32)
    ref = -np.ones((4, 2), dtype=np.float32)
    actions = np.array([[1, 5], [2, 5], [3, 5], [4, 5]])
    dones = np.array([[0, 0], [1, 0], [0, 0], [1, 1]], dtype=bool)
    lagrangian.charge(rewards, kl, ref, actions, dones)
    # episodes: env 0 (KL 1.0, length 2), env 0 (KL 3.0, length 2), env 1 (KL 0.4, length 4)
    lengths = np.array([2.0, 2.0, 4.0])
    low, high = np.quantile(lengths, [0.05, 0.95])
    spread = np.clip(lengths, low, high).std()  # winsorised
    unit = max(spread, 8 / 3 - 2)  # or the distance from the bound, if larger
    assert unit == spread
    assert lagrangian.units == pytest.approx([1.0, unit])
    # the dual step comes first, on the means over the three episodes (KL 4.4/3, length 8/3) moved one standard error
    # of the mean toward breaking the bound (the default margin_se of 1): sample std / √3
    se_kl, se_len = np.std([1.0, 3.0, 0.4], ddof=1) / np.sqrt(3), np.std(lengths, ddof=1) / np.sqrt(3)
    lam_kl = 0.2 + 0.5 * (4.4 / 3 - 1 + se_kl)
    lam_len = 0.2 + 0.5 * (8 / 3 - 2 + se_len) / unit
    assert lagrangian.lambdas == pytest.approx([lam_kl, lam_len])
    expected = -lam_kl * kl  # the stepped λ_kl per token, beside β
    expected[1, 0] -= lam_kl * -1.0 + lam_len * (2 - 2) / unit  # at each end: -λ_kl·c and λ_len·(length - c)/u
    expected[3, 0] -= lam_kl * -1.0 + lam_len * (2 - 2) / unit
    expected[3, 1] -= lam_kl * -1.0 + lam_len * (4 - 2) / unit
    assert rewards == pytest.approx(expected, abs=1e-6)
    # an episode's charges sum to λ·(g - c)/u over its quantities: env 1's, -(λ_kl·(0.4 - 1) + λ_len·(4 - 2)/u)
    assert rewards[:, 1].sum() == pytest.approx(-(lam_kl * (0.4 - 1) + lam_len * 2 / unit), abs=1e-6)

    logged = lagrangian.take_logged()
    assert logged is not None
    assert logged["kl<=1/mean"] == pytest.approx(4.4 / 3) and logged["length<=2/lambda"] == pytest.approx(lam_len)
    assert lagrangian.take_logged() is None  # taken once
    going_on = np.zeros((2, 2), np.float32)  # two more steps, no episode ends: no step, the per-token price only
    lagrangian.charge(going_on, np.ones((2, 2), np.float32), -np.ones((2, 2)), np.zeros((2, 2)), going_on == 1)
    assert lagrangian.take_logged() is None and lagrangian.lambdas == pytest.approx([lam_kl, lam_len])
    assert going_on == pytest.approx(np.full((2, 2), -lam_kl))

    relaxed = Lagrangian(parse_constraints(["kl<=10"]), lr=1.0, initial=0.3)
    relaxed.start(1)
    ones = np.ones((2, 1), np.float32)
    paid = np.zeros_like(ones)
    relaxed.charge(paid, ones, -ones, np.zeros((2, 1)), ones.astype(bool))
    assert relaxed.lambdas == pytest.approx([0.0])  # 0.3 + (1 - 10) projected onto λ >= 0 (one episode: no error)
    assert paid == pytest.approx(np.zeros_like(ones))  # and the rollout that showed the room pays nothing

    plain = Lagrangian(parse_constraints(["kl<=1"]), lr=0.5, margin_se=0.0)  # the plain mean
    plain.start(2)
    plain.charge(np.zeros((1, 2), np.float32), np.array([[1.0, 2.0]], np.float32), -np.ones((1, 2)),
                 np.zeros((1, 2)), np.ones((1, 2), bool))  # fmt: skip
    assert plain.lambdas == pytest.approx([0.5 * (1.5 - 1)])

    shared = Lagrangian(parse_constraints(["length<=4"]))  # every first episode at the limit of 8: no spread
    shared.start(2)
    shared.charge(np.zeros((8, 2), np.float32), np.zeros((8, 2), np.float32), -np.ones((8, 2)), np.zeros((8, 2)),
                  np.arange(8)[:, None].repeat(2, 1) == 7)  # fmt: skip
    assert shared.units == pytest.approx([4.0])  # the way from the start (8) to the bound (4) weighs one unit


def _tiny_config(tiny_model: Path, tmp_path: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {"total_timesteps": 2048, **overrides}
    return TrainConfig(
        model=str(tiny_model), reward_model="gold", n_envs=8, n_steps=8, batch_size=64,
        eval_prompts=2, bf16=False, max_new_tokens=8, max_prompt_tokens=128, lora_r=0, learning_rate=3e-3,
        constraint_lr=0.5, out=str(tmp_path / "runs"), **settings,  # type: ignore[arg-type]
    )  # fmt: skip


def _mean_length(run: object, n: int = 32) -> float:
    prompts = run.env.core.prompts[:n]  # type: ignore[attr-defined]
    return float(evaluate(run.algo.policy, run.env, prompts, seed=1).n_tokens.mean())  # type: ignore[attr-defined]


def test_a_length_bound_holds_where_the_unconstrained_run_breaks_it(tiny_model: Path, tmp_path: Path) -> None:
    lengths = {}
    for name, constraints in (("free", []), ("bounded", ["length<=4"])):
        run = build_run(_tiny_config(tiny_model, tmp_path, constraints=constraints), verbose=0)
        run.algo.learn(2048, callback=run.callbacks())
        lengths[name] = _mean_length(run)
        if constraints:
            history = run.kl.constraints.history  # type: ignore[union-attr]
            means = [h["length<=4/mean"] for h in history]
            assert means[0] > 6  # the tiny model runs to its length limit of 8 or near it
            assert np.mean(means[-8:]) <= 4 * 1.05 and history[-1]["length<=4/lambda"] > 0, means  # held late on
    # held out (sampled on other prompts): the unconstrained policy breaks the bound, the constrained one far less
    assert lengths["free"] > 6 and lengths["bounded"] < lengths["free"] - 2, lengths


def test_multipliers_survive_save_and_resume_exactly(tiny_model: Path, tmp_path: Path) -> None:
    config = _tiny_config(tiny_model, tmp_path, constraints=["length<=4", "kl<=2"], total_timesteps=256)
    report = train(config)
    run_dir = Path(report["run_dir"])
    saved = json.loads((run_dir / "checkpoint" / "state.json").read_text())["constraints"]
    assert [c["final_lambda"] for c in report["constraints"].values()] == saved["lambdas"]
    assert "| length<=4 |" in (run_dir / "report.md").read_text() and (run_dir / "training.png").is_file()
    for bound, key in (("length<=4", "length"), ("kl<=2", "kl")):  # the final policy, on the held-out completions
        assert report["constraints"][bound]["held_out_mean"] == pytest.approx(report["after"][key])
    resumed = build_run(replace(config, total_timesteps=512), verbose=0)
    restore_checkpoint(resumed, run_dir)
    assert resumed.kl.constraints is not None
    assert resumed.kl.constraints.lambdas.tolist() == saved["lambdas"]  # bit for bit
    assert resumed.kl.constraints.units.tolist() == saved["units"]  # type: ignore[union-attr]
    assert resumed.kl.constraints.history == saved["history"]


@pytest.mark.parametrize("algo", ["a2c", "trpo", "maskable_ppo"])
def test_every_algorithm_runs_the_constrained_objective(algo: str, tiny_model: Path, tmp_path: Path) -> None:
    config = TrainConfig.for_algo(
        algo, model=str(tiny_model), reward_model="gold", total_timesteps=128, n_envs=4, n_steps=8, batch_size=32,
        eval_prompts=2, bf16=False, max_new_tokens=8, max_prompt_tokens=128, constraints=["length<=4", "kl<=1"],
        constraint_init=1.0,
    )  # fmt: skip
    run = build_run(config, verbose=0)
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    history = run.kl.constraints.history  # type: ignore[union-attr]
    assert history and all(h["length<=4/lambda"] >= 0 and np.isfinite(h["kl<=1/mean"]) for h in history)
    assert any("constraint/length<=4/lambda" in row for row in run.metrics.history)  # logged beside the scores
