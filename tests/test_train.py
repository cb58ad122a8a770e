"""`agents.run.build_run`: every algorithm of `textgen train --algo` builds, learns and evaluates on a tiny env;
settings have one source; an interrupted `textgen train` resumes to the same result shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PROMPTS

from agents.evaluate import evaluate
from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy
from agents.run import (
    ALGORITHMS,
    BASELINES,
    TrainConfig,
    algorithm_class,
    algorithm_kwargs,
    build_run,
    make_algorithm,
    run_task,
)
from text_env import make_text_vec_env
from text_env.tasks import get_task, list_tasks


def tiny_config(tiny_model: Path) -> dict:
    """TrainConfig fields for a run of seconds on the tiny LM and the gold reward."""
    return dict(
        model=str(tiny_model), reward_model="gold", n_envs=2, n_steps=8, batch_size=8, max_new_tokens=4,
        max_prompt_tokens=128, eval_prompts=2, bf16=False,
    )  # fmt: skip


@pytest.mark.parametrize("algo", ALGORITHMS + BASELINES)
def test_build_run_learns_and_evaluates(tiny_model: Path, algo: str) -> None:
    """One place builds every algorithm's run; its eval env carries what the policy needs (masks included)."""
    config = TrainConfig.for_algo(
        algo, **tiny_config(tiny_model), total_timesteps=16, lora_r=0 if algo == "trpo" else 4
    )
    run = build_run(config, verbose=0)
    assert isinstance(run.algo, algorithm_class(algo))
    if algo in ALGORITHMS:
        expected = MaskableCausalLMPolicy if algo == "maskable_ppo" else CausalLMPolicy
        assert type(run.algo.policy) is expected
    assert hasattr(run.eval_env, "action_masks") == (algo == "maskable_ppo") == hasattr(run.env, "action_masks")
    run.algo.learn(16, callback=run.callbacks())
    assert run.algo.num_timesteps == 16 and run.metrics.history
    assert set(run.evaluate().summary) >= {"reward_model_score", "gold_score", "kl"}


def test_presets_are_the_one_source_of_settings() -> None:
    trpo = TrainConfig.for_algo("trpo")
    assert (trpo.lora_r, trpo.train_layers, trpo.learning_rate) == (0, 2, 1e-5)
    assert TrainConfig.for_algo("trpo", learning_rate=3e-5).learning_rate == 3e-5  # overrides win
    assert TrainConfig.for_algo("ppo") == TrainConfig()
    from agents.zoo import hyperparams

    for algo in ALGORITHMS:  # rl-zoo3's configs are the same settings
        zoo = hyperparams(algo)["TextGen-v0"]
        config = TrainConfig.for_algo(algo)
        assert zoo["n_timesteps"] == config.total_timesteps and zoo["learning_rate"] == config.learning_rate
        assert (
            zoo["policy_kwargs"]["lora"] == config.lora
            and zoo["callback"][0]["agents.kl.KLPenalty"]["beta"] == config.beta
        )


def test_trpo_with_lora_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="--lora-r 0"):
        TrainConfig(algo="trpo")


def test_held_out_evaluation_along_training_changes_nothing_else(tiny_model: Path) -> None:
    """--eval-every 2: after every second update the held-out summary (gold, KL, ...) joins the run's held-out
    history; training itself goes on exactly as without it (same rollouts, same weights), episodes running across
    rollouts included: the evaluation leaves the RNG and the rollout caches as they were."""
    histories, held_out, weights = [], [], []
    for every in (0, 2):
        settings = {**tiny_config(tiny_model), "max_new_tokens": 12}  # episodes span rollouts of 16 tokens
        config = TrainConfig(**settings, total_timesteps=96, lora_r=4, eval_every=every)
        run = build_run(config, verbose=0)
        run.algo.learn(config.total_timesteps, callback=run.callbacks())
        histories.append(run.metrics.history)
        held_out.append(run.metrics.held_out)
        weights.append(next(p for n, p in run.algo.policy.named_parameters() if "lora_B" in n).detach().clone())
    assert histories[0] == histories[1] and np.array_equal(weights[0].numpy(), weights[1].numpy())
    assert held_out[0] == [] and [row["timesteps"] for row in held_out[1]] == [32.0, 64.0]  # 96: the "after"
    assert {"gold_score", "kl", "reward_model_score", "distinct_2"} <= set(held_out[1][0])
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        TrainConfig(eval_every=-1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"algo": "dqn"}, "choose one of ppo, a2c, trpo, maskable_ppo, ppo_bag_of_tokens"),
     ({"n_envs": 0}, "n_envs must be at least 1"), ({"beta": -1.0}, "beta and ent_coef must be >= 0"),
     ({"ent_coef": -0.01}, "ent_coef must be >= 0"),
     ({"reward_scaling": "std"}, "reward_scaling must be one of auto, base-std, none"),
     ({"algo": "trpo", "lora_r": 0, "train_layers": 2, "ent_coef": 0.01}, "TRPO has no entropy bonus"),
     ({"prompt_group": 3}, r"prompt_group must divide n_envs=16 \(1: no groups\), got 3")],
)  # fmt: skip
def test_bad_settings_are_refused_when_made(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_entropy_bonus_reaches_every_algorithm_that_has_one() -> None:
    assert algorithm_kwargs(TrainConfig(ent_coef=0.01))["ent_coef"] == 0.01  # PPO's loss term (SB3's ent_coef)
    assert "ent_coef" not in algorithm_kwargs(TrainConfig.for_algo("trpo"))  # TRPO's constructor has none
    for algo in ("a2c", "maskable_ppo"):
        assert algorithm_kwargs(TrainConfig.for_algo(algo, ent_coef=0.02))["ent_coef"] == 0.02


def test_rewards_are_scaled_unless_a_learned_reward_model_gives_them(tmp_path: Path) -> None:
    """auto: a learned reward model (shipped or a directory) is already on β's scale; a gold scorer is not."""
    assert not TrainConfig().scales_rewards  # positive-review's shipped reward model
    assert not TrainConfig(reward_model=str(tmp_path)).scales_rewards
    assert TrainConfig(reward_model="gold").scales_rewards
    assert TrainConfig(task="dialogue").scales_rewards  # no reward model ships: its gold scorer rewards
    assert TrainConfig(reward_scaling="running-std").scales_rewards
    assert not TrainConfig(task="dialogue", reward_scaling="none").scales_rewards


def test_unknown_algorithm_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of ppo, a2c, trpo, maskable_ppo"):
        algorithm_class("dqn")


def test_tensorboard_shows_reward_kl_beta_gold_and_samples(tiny_model: Path, tmp_path: Path) -> None:
    from stable_baselines3.common.callbacks import CallbackList
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.callbacks import TextMetrics
    from agents.kl import KLPenalty

    env = make_text_vec_env(
        2, seed=0, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_new_tokens=4,
        max_prompt_tokens=24,
    )  # fmt: skip
    config = TrainConfig(
        model=str(tiny_model), n_steps=8, batch_size=8, bf16=False, out=str(tmp_path), tensorboard=True
    )
    model = make_algorithm(config, env)
    model.learn(32, callback=CallbackList([KLPenalty(), TextMetrics()]))
    (run,) = (tmp_path / "tensorboard").iterdir()
    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"rlhf/kl_per_token", "rlhf/kl_per_episode", "rlhf/beta", "rlhf/reward_model_score", "rlhf/gold_score"}
    assert expected <= scalars and "rollout/ep_rew_mean" in scalars
    assert any(tag.startswith("rlhf/samples") for tag in events.Tags()["tensors"])  # completions as text


def test_tensorboard_missing_says_how_to_install(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    env = make_text_vec_env(1, model=str(tiny_model), prompts=TINY_PROMPTS, reward_model="gold", max_prompt_tokens=24)
    hint = r"--tensorboard needs the 'tensorboard' extra: pip install -e \"\.\[tensorboard\]\""
    with pytest.raises(ImportError, match=hint):
        make_algorithm(TrainConfig(model=str(tiny_model), tensorboard=True, bf16=False), env)


def test_own_prompts_with_references_replace_the_task_train_split(tiny_model: Path, tmp_path: Path) -> None:
    """`textgen train --prompts data.jsonl --reference-column summary`: episodes are drawn from those records (their
    references reach `info`); the task's held-out split still evaluates."""
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{p} number {i}", "summary": f"ref {i}"} for i, p in enumerate(TINY_PROMPTS[:3])]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(**tiny_config(tiny_model), prompts=str(data), reference_column="summary", total_timesteps=8)
    task = run_task(config)
    assert [(e.prompt, e.references) for e in task.examples("train")] == [(r["prompt"], (r["summary"],)) for r in rows]
    assert task.examples("eval") == get_task(config.task).examples("eval")
    run = build_run(config, verbose=0)
    assert run.env.core.examples == task.examples("train") and run.eval_env.core.examples == task.examples("eval")
    obs, finished = run.env.reset(), []
    for _ in range(config.max_new_tokens):
        obs, _, dones, infos = run.env.step(run.algo.policy.predict(obs)[0])
        finished += [info for done, info in zip(dones, infos, strict=True) if done]
    assert len(finished) == config.n_envs
    assert all(tuple(info["references"]) in [(r["summary"],) for r in rows] for info in finished)
    with pytest.raises(ValueError, match="reference_column names a field of --prompts"):
        TrainConfig(reference_column="summary")


def test_peak_rss_is_the_process_own_not_its_parent() -> None:
    """A run started by a larger process (a benchmark that evaluated the base model first) reports its own peak:
    Linux carries getrusage's ru_maxrss across exec, so a child of a process that touched 1.5 GB read >= 1.5 GB."""
    import subprocess
    import sys

    ballast = bytearray(3 * 2**29)  # 1.5 GiB, touched
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))
    code = "from agents.train import peak_rss_gb; print(peak_rss_gb())"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    assert 0 < float(shown.stdout) < 1.2  # the imports' own (torch, SB3, transformers: ~0.5 GB)


@pytest.mark.default_model
@pytest.mark.parametrize("name", list_tasks())
def test_one_episode_of_every_task_on_the_default_model(name: str) -> None:
    """The embedded model plays one episode of each registered task's first eval prompt, rewarded as ``textgen
    train --task X`` rewards it (its shipped reward model, else its gold) and judged by the task's gold."""
    task = get_task(name)
    env = make_text_vec_env(1, seed=0, task=task, split="eval")
    policy = CausalLMPolicy(env.observation_space, env.action_space, lambda _: 0.0, model="default")
    result = evaluate(policy, env, task.examples("eval")[:1])
    env.close()
    assert 1 <= result.n_tokens[0] <= task.max_new_tokens and isinstance(result.completions[0], str)
    assert -1.0 <= result.gold_score[0] <= 1.0 and np.isfinite(result.reward_model_score[0])
    assert np.isfinite(result.kl[0]) and abs(result.kl[0]) < 0.05  # untrained: the policy is its reference


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("mode", ["minibatch", "rollout", "none"])
def test_advantage_normalization_is_wired_to_the_buffer_or_the_algorithm(
    tiny_model: Path, algo: str, mode: str
) -> None:
    """`--advantage-normalization rollout`: the episode buffer normalises once, the algorithm not per minibatch;
    `minibatch`: SB3's own (A2C's own default is none); `none`: neither."""
    config = TrainConfig.for_algo(algo, **tiny_config(tiny_model), total_timesteps=16, advantage_normalization=mode,
                                  lora_r=0 if algo == "trpo" else 4)  # fmt: skip
    run = build_run(config, verbose=0)
    assert run.algo.rollout_buffer.normalize_advantage == (mode == "rollout")
    expected = mode == "minibatch" and algo != "a2c"
    assert run.algo.normalize_advantage == expected
    run.algo.learn(16, callback=run.callbacks())
    if mode == "rollout":
        assert abs(float(run.algo.rollout_buffer.advantages.mean())) < 1e-5
    with pytest.raises(ValueError, match="advantage_normalization must be one of minibatch, rollout, none"):
        TrainConfig(advantage_normalization="episode")


def test_prompt_group_reaches_the_training_env_and_its_baseline(tiny_model: Path, tmp_path: Path) -> None:
    """--prompt-group 2: the training env answers prompts in pairs and the KL penalty subtracts their baseline (its
    arithmetic: test_kl); the held-out env answers each prompt once."""
    config = TrainConfig(**{**tiny_config(tiny_model), "n_envs": 4}, total_timesteps=64, prompt_group=2)
    run = build_run(config, verbose=0)
    assert run.env.get_attr("prompt_group") == [2] * 4 and run.eval_env.get_attr("prompt_group") == [1] * 4
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    assert run.kl.prompt_baseline is not None and run.kl.prompt_baseline.group == 2


@pytest.mark.parametrize("lora_r", [4, 0])
def test_reference_ema_follows_the_policy_and_is_saved(tiny_model: Path, tmp_path: Path, lora_r: int) -> None:
    """--ref-ema τ: after each update the KL reference moves by τ toward the policy's weights (LoRA: the merged
    W0 + s·B·A), by hand on one layer; held-out KL is still to the starting model; model.zip carries the moving
    reference, so PPO.load gets it back."""
    from stable_baselines3 import PPO

    from text_env.models import load_causal_lm

    config = TrainConfig(**tiny_config(tiny_model), total_timesteps=32, lora_r=lora_r, ref_ema=0.5,
                         learning_rate=1e-2)  # fmt: skip
    run = build_run(config, verbose=0)
    policy = run.algo.policy
    base = load_causal_lm(str(tiny_model)).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    run.algo.learn(config.total_timesteps, callback=run.callbacks())  # 2 rollouts: one EMA step, after update 1
    reference = policy._reference_lm.state_dict()[key]
    assert not torch.equal(reference, base[key])
    before = reference.clone()
    policy.follow_policy()  # by hand: ref <- ref + τ (W - ref)
    if lora_r:
        layer = policy.lm.base_model.model.model.layers[0].self_attn.q_proj
        weight = layer.base_layer.weight + layer.get_delta_weight("default")
    else:
        weight = policy.lm.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(policy._reference_lm.state_dict()[key], before + 0.5 * (weight - before), atol=1e-6)
    assert abs(run.evaluate().summary["kl"]) > 0  # to the starting model, not to the moving reference
    run.algo.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=run.env)
    assert torch.equal(loaded.policy._reference_lm.state_dict()[key], policy._reference_lm.state_dict()[key])
    with pytest.raises(ValueError, match="ref_ema is a weight in"):
        TrainConfig(ref_ema=1.5)
    with pytest.raises(ValueError, match="has no LM"):
        TrainConfig(ref_ema=0.1, algo="ppo_bag_of_tokens")


def test_a_checkpoint_is_replaced_whole_and_a_save_cut_between_its_renames_is_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines save through replace_directory: a write that dies leaves the last complete checkpoint, and a
    process killed between removing the old one and renaming the new leaves a complete .new that resuming takes;
    an incomplete .new (no marker) is not taken."""
    from agents.train import completed_directory, replace_directory

    target, new = tmp_path / "checkpoint", tmp_path / "checkpoint.new"
    replace_directory(target, lambda d: (d / "state.json").write_text("1"))

    def dies(d: Path) -> None:
        (d / "model.zip").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_directory(target, dies)
    assert (completed_directory(target, "state.json") / "state.json").read_text() == "1"  # the last whole one
    assert not (new / "state.json").exists()
    shutil.rmtree(new)
    target.rename(new)  # killed after the removal, before the rename
    assert (completed_directory(target, "state.json") / "state.json").read_text() == "1" and not new.exists()
    shutil.rmtree(target)
    new.mkdir()
    assert not (completed_directory(target, "state.json") / "state.json").is_file() and new.is_dir()
    # the swap is by renames: the old checkpoint is never deleted in place (a kill halfway through a delete would
    # leave it half gone with its marker), and a kill between the two renames leaves the new one to complete
    shutil.rmtree(new)
    replace_directory(target, lambda d: (d / "state.json").write_text("1"))
    deleted, rename, rmtree = [], Path.rename, shutil.rmtree

    def killed_at_second_rename(self: Path, to: Path) -> Path:
        if self == new:
            raise KeyboardInterrupt
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", killed_at_second_rename)
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (deleted.append(Path(path)), rmtree(path, **kw)))
    with pytest.raises(KeyboardInterrupt):
        replace_directory(target, lambda d: (d / "state.json").write_text("2"))
    monkeypatch.undo()
    assert target not in deleted and not target.exists()
    assert (completed_directory(target, "state.json") / "state.json").read_text() == "2"
    replace_directory(target, lambda d: (d / "state.json").write_text("3"))  # the moved-aside one goes
    assert (target / "state.json").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
