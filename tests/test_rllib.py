"""The RLlib engine (`agents.rllib`): RLlib's PPO trains the LM RLModule on a local Ray with one EnvRunner process;
the KL penalty is in the rewards before GAE (checked against a hand recomputation on a real batch); a checkpoint
restores identical greedy actions; the export loads in `transformers.pipeline`; bad input fails fast and clearly."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the RLlib engine needs pip install 'textgen-rl[rllib]'")

from helpers import unpadded_outputs  # noqa: E402
from ray.rllib.connectors.learner import GeneralAdvantageEstimation  # noqa: E402
from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.learner.training_data import TrainingData  # noqa: E402
from ray.rllib.core.rl_module.rl_module import RLModuleSpec  # noqa: E402
from ray.rllib.env.env_context import EnvContext  # noqa: E402
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch  # noqa: E402

from agents.buffers import episode_batches  # noqa: E402
from agents.cli import main  # noqa: E402
from agents.inspection import inspect_run  # noqa: E402
from agents.kl import DEFAULT_BETA, KLController  # noqa: E402
from agents.rllib import (  # noqa: E402
    REF_LOGP,
    CausalLMRLModule,
    KLRewardPenalty,
    connect_ray,
    export_rllib,
    load_rllib_module,
    make_rllib_env,
    rllib_config,
    train_rllib,
)
from agents.rllib.learner import REWARD_SCALE, EpisodeMinibatches, RealRowAdvantages  # noqa: E402
from agents.rllib.module import SAMPLING_MASK  # noqa: E402
from agents.run import TrainConfig, kl_horizon, make_algorithm, make_env  # noqa: E402
from text_env.models import load_frozen_causal_lm  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_config(tiny_model: Path, out: Path, **overrides: Any) -> TrainConfig:
    """A run of seconds: the tiny LM, the gold reward, 2 envs x 8 steps (16 tokens) per iteration, LoRA r=4."""
    return TrainConfig(
        **{
            "model": str(tiny_model), "reward_model": "gold", "n_envs": 2, "n_steps": 8, "batch_size": 8,
            "max_new_tokens": 4, "max_prompt_tokens": 128, "eval_prompts": 2, "bf16": False, "lora_r": 4,
            "learning_rate": 1e-2, "total_timesteps": 32, "out": str(out), **overrides,
        }
    )  # fmt: skip


def greedy(module: CausalLMRLModule, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """RLlib's inference pass: logits ``(B, V)`` and the greedy tokens ``(B,)`` (what ``explore=False`` takes)."""
    logits = module.forward_inference({Columns.OBS: {k: torch.as_tensor(v) for k, v in obs.items()}})
    logits = logits[Columns.ACTION_DIST_INPUTS]
    return logits, logits.argmax(-1)


def test_filtered_sampling_trains_on_the_nucleus_that_sampled(tiny_model: Path, tmp_path: Path) -> None:
    """With top_p 0.5 the EnvRunner's module sends each action's nucleus with it (bit-packed), and the Learner's
    pass evaluates the action under that nucleus: finite after the weights moved, where the nucleus of the new
    weights dropped some of the sampled tokens."""
    torch.manual_seed(0)
    env = make_env(tiny_config(tiny_model, tmp_path, n_envs=8), "train")
    module = CausalLMRLModule(observation_space=env.observation_space, action_space=env.action_space,
                              model_config={"model": str(tiny_model), "top_p": 0.5, "bf16": False})  # fmt: skip
    obs = {k: torch.as_tensor(v) for k, v in env.reset().items()}
    sampled = module.forward_exploration({Columns.OBS: obs})
    bits = sampled[SAMPLING_MASK]  # (B, ceil(V / 8)) uint8
    assert bits.dtype == torch.uint8 and bits.shape == (env.num_envs, -(-env.action_space.n // 8))
    actions = sampled[Columns.ACTIONS]
    with torch.no_grad():
        for p in module.policy.lm.parameters():
            p.add_(torch.randn_like(p))
        batch = {Columns.OBS: obs, SAMPLING_MASK: bits}
        stored = module.forward_train(batch)[Columns.ACTION_DIST_INPUTS].gather(1, actions[:, None])  # log π(a)
        current = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS].gather(1, actions[:, None])
    assert torch.isfinite(stored).all() and torch.isinf(current).any()


def test_building_the_module_logs_no_deprecation(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RLlib's RLModule.__init__ fills a legacy RLModuleConfig for every module and logs its deprecation; ours is
    built with today's keyword constructor, and that notice is dropped. Other deprecations still pass."""
    from ray._common.deprecation import deprecation_warning

    env = make_env(tiny_config(tiny_model, tmp_path), "eval")
    logger = logging.getLogger("ray._common.deprecation")  # Ray's loggers do not propagate to the root's capture
    logger.addHandler(caplog.handler)
    try:
        spec = RLModuleSpec(module_class=CausalLMRLModule, observation_space=env.observation_space,
                            action_space=env.action_space, model_config={"model": str(tiny_model)})  # fmt: skip
        spec.build()
        deprecation_warning(old="something_else()", error=False)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "RLModuleConfig" in m], messages
    assert any("something_else()" in m for m in messages)


def test_unreachable_ray_address_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not ray.is_initialized()  # these two run before the module's Ray starts: connect_ray leaves one alone
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # loopback, a port nothing listens on
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"RAY_ADDRESS='127\.0\.0\.1:1'.*ray start --head"):
        connect_ray(timeout=2.0)
    assert time.monotonic() - start < 10 and not ray.is_initialized()


def test_missing_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "agents.rllib" or m.startswith("agents.rllib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees without the extra
    with pytest.raises(ImportError, match=r"needs the 'rllib' extra: pip install -e \"\.\[rllib\]\""):
        importlib.import_module("agents.rllib")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray for the module's tests (EnvRunner processes; the Learner runs in this process). Its 6 CPUs are
    slots, not cores: the module's live algorithm holds two EnvRunners while another test's run needs up to three
    more (one EnvRunner and two Learners)."""
    started = connect_ray("local", num_cpus=6)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def trained(local_ray: None, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """RLlib's own idiom: the PPOConfig of a TrainConfig, built, trained 2 iterations by 2 EnvRunner processes (one
    env each), saved; the live algorithm."""
    out = tmp_path_factory.mktemp("rllib")
    config = tiny_config(tiny_model, out)
    algo_config = rllib_config(config, num_env_runners=2)
    # the gold reward is scaled, by a divisor train_rllib measures on base samples; here one set by hand
    algo_config.learners(learner_config_dict={**algo_config.learner_config_dict, REWARD_SCALE: 0.5})
    algo = algo_config.build_algo()
    results = [algo.train() for _ in range(2)]
    module = algo.learner_group.foreach_learner(lambda learner: learner.module[DEFAULT_MODULE_ID])
    checkpoint = Path(algo.save_to_path(str(out / "checkpoint")))
    yield {"config": config, "algo": algo, "results": results, "module": next(iter(module)).get(), "ckpt": checkpoint}
    algo.stop()


def test_ppo_trains_the_lm_module_with_rlhf_metrics(trained: dict[str, Any]) -> None:
    """Each iteration samples n_envs x n_steps tokens in the EnvRunner and logs KL, β and both scores; training
    moves the LoRA adapters (B starts at 0) and the value head, not the frozen base."""
    for i, result in enumerate(trained["results"], 1):
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 16 * i
        rlhf = result["rlhf"]
        assert rlhf["episodes"] == 4 and rlhf["beta"] == pytest.approx(DEFAULT_BETA)  # 16 tokens / 4 per episode
        assert {"reward_model_score", "gold_score", "kl_per_episode", "kl_per_token"} <= set(rlhf)
        assert np.isfinite([rlhf["kl_per_episode"], rlhf["gold_score"]]).all()
    learner = trained["results"][-1]["learners"][DEFAULT_MODULE_ID]
    assert learner["rlhf_beta"] == pytest.approx(DEFAULT_BETA) and math.isfinite(learner["rlhf_kl_per_token"])
    module: CausalLMRLModule = trained["module"]
    trainable = module.get_state()
    assert any("lora_B" in name and np.abs(value).max() > 0 for name, value in trainable.items())
    assert "policy.value_head.weight" in trainable
    assert not any("base_layer" in name for name in trainable)  # frozen weights do not travel to EnvRunners


def test_kl_penalty_is_in_the_rewards_before_gae(trained: dict[str, Any], tiny_model: Path) -> None:
    """On episodes sampled by the EnvRunner, the Learner's connector pipeline turns each reward into
    r / s − β·(log π(a|s) − log π_ref(a|s)), recomputed here by hand from each observation's tokens alone, and GAE
    runs on those rewards; s is the reward scale the driver gives every Learner (the gold scorer is not normalised:
    the run scales it, as SB3's KLPenalty does)."""
    algo, module, beta = trained["algo"], trained["module"], trained["config"].beta
    episodes = algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.sample(num_timesteps=8), local_env_runner=False
    )[0]
    reference = load_frozen_causal_lm(str(tiny_model))
    expected, kls = [], []
    for episode in episodes:
        steps = len(episode)
        observations = {k: np.array(v) for k, v in episode.get_observations(slice(0, steps)).items()}  # (T, L) each
        actions = torch.as_tensor(np.array(episode.get_actions()))  # (T,)
        log_pi = torch.log_softmax(unpadded_outputs(module.policy.lm, observations)[0], -1)  # (T, V)
        log_ref = torch.log_softmax(unpadded_outputs(reference, observations)[0], -1)  # (T, V)
        kl = (log_pi - log_ref)[torch.arange(steps), actions]  # (T,)
        kls.append(kl)
        recorded = torch.as_tensor(np.asarray(episode.get_extra_model_outputs(REF_LOGP)))  # (T,) by the EnvRunner
        assert torch.allclose(recorded, log_ref[torch.arange(steps), actions], atol=1e-4)
        rewards = torch.as_tensor(np.asarray(episode.get_rewards()), dtype=torch.float32)
        expected.append((rewards, kl))
    assert torch.cat(kls).abs().max() > 1e-3  # trained at lr 1e-2: the policy has left the reference

    def pipeline(learner: Any) -> tuple[list[str], dict[str, Any], float]:
        names = [type(piece).__name__ for piece in learner._learner_connector.connectors]
        batch = learner._learner_connector(
            rl_module=learner.module, batch={}, episodes=episodes, shared_data={}, metrics=learner.metrics
        )
        return names, batch[DEFAULT_MODULE_ID], learner._learner_connector[KLRewardPenalty][0].scale

    names, batch, scale = next(iter(algo.learner_group.foreach_learner(pipeline))).get()
    assert trained["config"].scales_rewards and scale == 0.5  # every Learner divides by the one given
    assert names.index(KLRewardPenalty.__name__) == names.index(GeneralAdvantageEstimation.__name__) - 1
    shaped = [torch.cat([r / scale - beta * kl, torch.zeros(1)]) for r, kl in expected]  # + RLlib's bootstrap row
    assert torch.allclose(batch[Columns.REWARDS].float(), torch.cat(shaped), atol=1e-4)
    assert "advantages" in batch and "value_targets" in batch
    # standardised over the rows where an action was taken, as SB3's rollout normalisation; not over RLlib's
    # bootstrap rows, whose "advantage" spans two episodes
    assert names.index(RealRowAdvantages.__name__) == names.index(GeneralAdvantageEstimation.__name__) + 1
    real = torch.as_tensor(batch[Columns.LOSS_MASK])
    advantages = torch.as_tensor(batch["advantages"]).double()
    assert int((~real).sum()) == len(episodes)  # one bootstrap row per episode chunk
    assert abs(float(advantages[real].mean())) < 1e-6 and float(advantages[real].std(correction=0)) == pytest.approx(1)


def test_learner_loss_is_sb3_ppos_by_hand(trained: dict[str, Any]) -> None:
    """On episodes sampled by the EnvRunners, the Learner's PPO loss is SB3 PPO's, computed here by hand: GAE
    (γ, λ 0.95) on the shaped rewards with the module's values (0 after a finished episode's last token, the next
    observation's after a cut), advantages standardised over the real rows (population std + 1e-8, SB3's rollout
    normalisation), the ratio to the recorded log-probs clipped at 0.2, 0.5·(V − R)² unclipped, the entropy bonus,
    no KL loss term, one mean over the real rows."""
    algo, config = trained["algo"], trained["config"]
    episodes = algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.sample(num_timesteps=8), local_env_runner=False
    )[0]
    finished = [episode.is_terminated for episode in episodes]

    def loss(learner: Any) -> tuple[float, dict[str, torch.Tensor]]:
        batch = learner._learner_connector(
            rl_module=learner.module, batch={}, episodes=episodes, shared_data={}, metrics=learner.metrics
        )[DEFAULT_MODULE_ID]
        module = learner.module[DEFAULT_MODULE_ID]
        shift = torch.linspace(-0.5, 0.5, len(batch[Columns.ACTION_LOGP]))  # ratios inside and outside the clip
        batch[Columns.ACTION_LOGP] = torch.as_tensor(batch[Columns.ACTION_LOGP]) + shift
        with torch.no_grad():
            out = module.forward_train(batch)
            total = learner.compute_loss_for_module(
                module_id=DEFAULT_MODULE_ID, config=learner.config.get_config_for_module(DEFAULT_MODULE_ID),
                batch=batch, fwd_out=out,
            )  # fmt: skip
            values = module.compute_values(batch)
        keys = (Columns.REWARDS, Columns.LOSS_MASK, Columns.ACTIONS, Columns.ACTION_LOGP)
        return float(total), {**{k: torch.as_tensor(batch[k]) for k in keys}, "values": values,
                              "logits": out[Columns.ACTION_DIST_INPUTS]}  # fmt: skip

    total, b = next(iter(algo.learner_group.foreach_learner(loss))).get()
    real, rewards, values = b[Columns.LOSS_MASK].bool(), b[Columns.REWARDS].double(), b["values"].double()
    ends = torch.nonzero(~real).squeeze(1).tolist()  # each chunk's appended bootstrap row
    assert len(ends) == len(episodes)
    advantages = torch.zeros_like(values)
    start = 0
    for end, done in zip(ends, finished, strict=True):
        following, running = 0.0 if done else float(values[end]), 0.0
        for t in range(end - 1, start - 1, -1):
            delta = float(rewards[t]) + config.gamma * following - float(values[t])
            running = delta + config.gamma * 0.95 * running
            advantages[t], following = running, float(values[t])
        start = end + 1
    returns = advantages + values
    a = advantages[real]
    a = (a - a.mean()) / (a.std(correction=0) + 1e-8)
    log_probs = torch.log_softmax(b["logits"].double(), -1)[real]  # (N, V)
    log_p = log_probs.gather(1, b[Columns.ACTIONS][real].long().unsqueeze(1)).squeeze(1)
    ratio = torch.exp(log_p - b[Columns.ACTION_LOGP][real].double())
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    surrogate = torch.min(a * ratio, a * ratio.clamp(0.8, 1.2))
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    expected = (-surrogate + 0.5 * (values[real] - returns[real]) ** 2 - config.ent_coef * entropy).mean()
    assert total == pytest.approx(float(expected), abs=1e-5)


def test_minibatches_are_sb3s_whole_shuffled_episodes() -> None:
    """A 512-token iteration of 16 episodes of 32 (each chunk followed by GAE's bootstrap row) trains in 16
    minibatches of 128 real rows at 4 epochs, as SB3's EpisodeRolloutBuffer cuts the same episodes, not RLlib's 17
    contiguous slices: no bootstrap row, no episode cut in two, each real row once per epoch, a new order each
    epoch."""
    chunks = [32] * 12 + [16, 16, 8, 24, 32, 32]  # episodes of the 16 envs, some ended early (512 tokens)
    row_chunk = np.concatenate([np.full(n + 1, i) for i, n in enumerate(chunks)])  # (N,) + one bootstrap row each
    real = np.concatenate([[True] * n + [False] for n in chunks])
    rows = SampleBatch({Columns.LOSS_MASK: real, "chunk": row_chunk, "row": np.arange(len(real))})
    batches = list(EpisodeMinibatches(MultiAgentBatch({"p": rows}, len(rows)), num_epochs=4, minibatch_size=128,
                                      rng=np.random.default_rng(0)))  # fmt: skip
    starts = np.zeros((32, 16))  # the SB3 buffer's view of the same chunks: (n_steps, n_envs)
    assert len(batches) == 16 == 4 * len(episode_batches(starts, 128))
    epochs = [np.concatenate([b.policy_batches["p"]["row"] for b in batches[e * 4 : (e + 1) * 4]]) for e in range(4)]
    for batch in batches:
        minibatch = batch.policy_batches["p"]
        assert minibatch[Columns.LOSS_MASK].all() and abs(len(minibatch) - 128) <= 32  # cut within a chunk of 128
        for chunk in np.unique(minibatch["chunk"]):  # whole, in order
            assert np.array_equal(
                minibatch["row"][minibatch["chunk"] == chunk], np.flatnonzero(real & (row_chunk == chunk))
            )
    for order in epochs:
        assert np.array_equal(np.sort(order), np.flatnonzero(real))
    assert not np.array_equal(epochs[0], epochs[1])
    lockstep = EpisodeMinibatches(MultiAgentBatch({"p": rows}, len(rows)), num_epochs=4, minibatch_size=128,
                                  rng=np.random.default_rng(0), num_total_minibatches=18)  # fmt: skip
    assert len(list(lockstep)) == 18  # several Learners take RLlib's common count of steps


def test_learner_iterates_episode_minibatches(trained: dict[str, Any]) -> None:
    """The Learner's update iterates EpisodeMinibatches over the batch its connectors build from sampled episodes."""
    algo = trained["algo"]
    episodes = algo.env_runner_group.foreach_env_runner(
        lambda runner: runner.sample(num_timesteps=16), local_env_runner=False
    )[0]

    def minibatches(learner: Any) -> tuple[str, list[int], int]:
        iterator = learner._create_iterator_if_necessary(
            training_data=TrainingData(episodes=episodes), num_epochs=2, minibatch_size=8
        )
        sizes = [len(b.policy_batches[DEFAULT_MODULE_ID]) for b in iterator]
        return type(iterator).__name__, sizes, int(np.asarray(iterator.rows[Columns.LOSS_MASK]).sum())

    name, sizes, real = next(iter(algo.learner_group.foreach_learner(minibatches))).get()
    assert name == "EpisodeMinibatches" and sum(sizes) == 2 * real  # real rows only, each once per epoch
    assert len(sizes) == 2 * math.ceil(real / 8)  # chunks of at most 4 tokens: a cut near every 8


def test_learner_steps_with_sb3s_adam(trained: dict[str, Any], tiny_model: Path) -> None:
    """The Learner's optimizer is Adam with the SB3 path's settings (ε 1e-5, not torch's 1e-8), on the trainable
    tensors only."""
    algo, config = trained["algo"], trained["config"]

    def settings(learner: Any) -> tuple[str, dict[str, Any], int]:
        optimizer = learner.get_optimizer()
        return type(optimizer).__name__, dict(optimizer.defaults), sum(len(g["params"]) for g in optimizer.param_groups)

    name, defaults, tensors = next(iter(algo.learner_group.foreach_learner(settings))).get()
    sb3 = make_algorithm(config, make_env(config), verbose=0).policy.optimizer
    assert name == type(sb3).__name__ == "Adam" and defaults["eps"] == sb3.defaults["eps"] == 1e-5
    assert defaults["betas"] == sb3.defaults["betas"] and tensors == len(trained["module"].get_state())


def test_env_runners_draw_the_sb3_paths_prompt_streams(tiny_model: Path, tmp_path: Path) -> None:
    """RLlib resets EnvRunner w's k envs with seeds seed + w + i; make_rllib_env shifts them so that 2 runners x 4
    envs draw the prompts of the SB3 path's 8 envs (env j: seed + j), none twice."""
    config = tiny_config(tiny_model, tmp_path, n_envs=8, seed=5)
    env_config = rllib_config(config, num_env_runners=2).env_config
    drawn = []
    for worker in (1, 2):
        context = EnvContext(env_config, worker_index=worker, num_workers=2)
        vector = gym.vector.SyncVectorEnv([lambda context=context: make_rllib_env(context)] * 4)
        drawn += [tuple(row) for row in vector.reset(seed=config.seed + worker)[0]["input_ids"]]  # as RLlib seeds
    sb3 = [tuple(row) for row in make_env(config).reset()["input_ids"]]
    assert drawn == sb3 and len(set(drawn)) == 8


def test_checkpoint_restores_identical_greedy_actions(trained: dict[str, Any], tiny_model: Path) -> None:
    env = make_env(trained["config"], "eval")
    obs = env.reset()
    for _ in range(2):  # a few generated tokens in the observations, not only prompts
        obs, _, _, _ = env.step(np.zeros(env.num_envs, dtype=np.int64) + 5)
    logits, actions = greedy(trained["module"], obs)
    restored = load_rllib_module(trained["ckpt"])
    restored_logits, restored_actions = greedy(restored, obs)
    assert torch.equal(actions, restored_actions)
    assert torch.allclose(logits, restored_logits, atol=1e-5)
    fresh_logits, _ = greedy(load_rllib_module(trained["ckpt"]), obs)  # twice: nothing of the first load leaks
    assert torch.allclose(fresh_logits, restored_logits)
    base = CausalLMRLModule(observation_space=env.observation_space, action_space=env.action_space,
                            model_config={"model": str(tiny_model), "lora": {"r": 4}, "bf16": False})  # fmt: skip
    assert not torch.allclose(greedy(base, obs)[0], logits, atol=1e-3)  # the checkpoint holds trained weights


def test_export_loads_in_transformers_pipeline(trained: dict[str, Any], tmp_path: Path) -> None:
    from transformers import pipeline

    path = export_rllib(trained["ckpt"], tmp_path / "exported")
    generate = pipeline("text-generation", model=str(path))
    text = generate("the movie was", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the movie was")
    with pytest.raises(FileNotFoundError, match="save_to_path"):
        export_rllib(tmp_path, tmp_path / "again")


def test_train_rllib_reports_before_after_and_adapts_beta(local_ray: None, tiny_model: Path, tmp_path: Path) -> None:
    """The whole `textgen train --engine rllib` run, here with full fine-tuning and bf16 (the fixture: LoRA, float32):
    the report of textgen train, the held-out evaluation along training, and the adaptive β pushed to the Learner."""
    config = tiny_config(tiny_model, tmp_path, target_kl=1.0, lora_r=0, bf16=True, eval_every=1)
    report = train_rllib(config, num_env_runners=1)
    (held_out,) = report["held_out_history"]  # after iteration 1 (iteration 2's is the "after")
    assert held_out["timesteps"] == 16 and {"gold_score", "kl"} <= set(held_out)
    run_dir = Path(report["run_dir"])
    for name in ("config.json", "before.json", "report.json", "report.md"):
        assert (run_dir / name).is_file()
    main(["export", str(run_dir), str(tmp_path / "lm")])  # textgen export takes the run directory
    assert (tmp_path / "lm" / "config.json").is_file()
    view = inspect_run(run_dir, n_prompts=2)  # textgen inspect reads RLlib runs too
    assert view.meta["engine"] == "rllib" and len(view.trained) == 2
    assert all(len(t.kl) == len(t.tokens) > 0 and np.isfinite(t.value).all() for t in view.trained + view.base)
    assert report["tokens"] == 32 and report["tokens_per_second"] > 0 and len(report["history"]) == 2
    assert set(report["before"]) >= {"gold_score", "reward_model_score", "kl"} and report["after"]["kl"] != 0
    controller = KLController(config.beta, config.target_kl, kl_horizon(config))  # replay the driver's β updates
    for row in report["history"]:
        assert row["beta"] == pytest.approx(controller.beta)
        controller.update(row["kl_per_episode"], int(row["episodes"]))
    assert report["final_beta"] == pytest.approx(controller.beta) and report["final_beta"] < config.beta


def test_constraints_are_charged_in_the_connector_as_sb3_charges_them() -> None:
    """The Learner's KLRewardPenalty with multipliers gives the rewards and the dual step that SB3's KLPenalty gives
    on the same two episode chunks (one finished, one going on): λ's step on the finished ones, then λ_kl added to β
    per token and each finished episode charged at its last token from the quantities its EnvRunner measured."""
    from types import SimpleNamespace

    from agents.constraints import Lagrangian, episode_quantities, parse_constraints
    from agents.rllib.learner import QUANTITIES_KEY

    bounds = parse_constraints(["length<=2", "kl<=0.5", "distinct2>=0.9"])
    rng = np.random.default_rng(0)
    logp, ref = -rng.random((3, 2)), -rng.random((3, 2))  # (n_steps, envs): env 0 ends at step 2, env 1 goes on
    paid, actions = np.array([[0.0, 0.0], [0.0, 0.0], [0.7, 0.0]]), np.array([[5, 6], [5, 7], [5, 8]])
    dones = np.array([[False, False], [False, False], [True, False]])
    beta, kl = 0.1, logp - ref
    sb3 = Lagrangian(bounds, lr=0.5, initial=1.0)
    sb3.start(2)
    expected = (paid - beta * kl).astype(np.float32)
    sb3.charge(expected, kl, ref, actions, dones)
    sb3_logged = sb3.take_logged()

    connector = KLRewardPenalty(beta=beta, constraints=Lagrangian(bounds, lr=0.5, initial=1.0))
    measured = episode_quantities(kl[:, 0], ref[:, 0], actions[:, 0].tolist())  # what env 0's EnvRunner sends
    episodes = [SimpleNamespace(is_done=True, custom_data={QUANTITIES_KEY: measured}), SimpleNamespace(is_done=False)]
    column = lambda x: torch.as_tensor(np.concatenate([x[:, 0], [0], x[:, 1], [0]]), dtype=torch.float32)  # noqa: E731
    columns = {
        Columns.ACTION_LOGP: column(logp), REF_LOGP: column(ref), Columns.REWARDS: column(paid),
        Columns.LOSS_MASK: torch.tensor([True] * 3 + [False] + [True] * 3 + [False]),
    }  # fmt: skip
    batch = connector(rl_module=None, batch={"p": columns}, episodes=episodes, metrics=None)
    rewards = batch["p"][Columns.REWARDS].numpy()
    assert np.allclose(rewards[[0, 1, 2, 4, 5, 6]], np.concatenate([expected[:, 0], expected[:, 1]]), atol=1e-6)
    assert rewards[2] < expected[2, 0] + 1e-6 and sb3_logged is not None  # length 3 > 2: charged
    assert connector.constraints.lambdas.tolist() == sb3.lambdas.tolist()
    assert connector.constraints.units.tolist() == sb3.units.tolist()  # type: ignore[union-attr]


def test_constrained_composite_run_reports_and_resumes_its_multipliers(
    local_ray: None, tiny_model: Path, tmp_path: Path
) -> None:
    """`textgen train --engine rllib --reward ... --constraint ...`: each component and each multiplier logged per
    iteration, the report's constraint table, and λ (with β) saved beside RLlib's checkpoint and put back into the
    Learner bit for bit, as --resume does."""
    from agents.rllib.train import STATE_FILE, _restore_learner_state

    config = tiny_config(tiny_model, tmp_path, reward="gold + 0.1*words", constraints=["length<=2", "kl<=3"],
                         constraint_init=0.5, target_kl=1.0)  # fmt: skip
    report = train_rllib(config, num_env_runners=1)
    history = report["history"]
    assert all("reward/gold" in row and "reward/words" in row for row in history)
    assert all(row["constraint/length<=2/lambda"] >= 0 for row in history)
    assert history[-1]["constraint/length<=2/mean"] > 2  # the tiny model writes its 4 tokens: λ grows
    assert report["constraints"]["length<=2"]["final_lambda"] == history[-1]["constraint/length<=2/lambda"] > 0.5
    run_dir = Path(report["run_dir"])
    assert "| length<=2 |" in (run_dir / "report.md").read_text()
    saved = json.loads((run_dir / "checkpoint" / STATE_FILE).read_text())
    algo = rllib_config(config, num_env_runners=0).build_algo()
    try:
        _restore_learner_state(algo, saved)
        state, beta = next(iter(algo.learner_group.foreach_learner(
            lambda learner: (learner.constraint_state(), learner.kl_beta())))).get()  # fmt: skip
        callback = algo.callbacks[0] if isinstance(algo.callbacks, list) else algo.callbacks
    finally:
        algo.stop()
    assert state == saved["constraints"] and beta == saved["beta"] == report["final_beta"] != config.beta
    assert callback.controller.beta == saved["beta"]


def test_two_learners_step_on_their_shares_and_share_one_multiplier(
    local_ray: None, tiny_model: Path, tmp_path: Path
) -> None:
    """Data-parallel Learners (DDP, in lockstep on EpisodeMinibatches' common count) each take λ's step on their own
    episodes; the driver gives them all the mean, so every Learner charges the same price."""
    config = tiny_config(tiny_model, tmp_path, n_envs=4, constraints=["length<=2"], constraint_init=0.5)
    algo = rllib_config(config, num_env_runners=1, num_learners=2).build_algo()
    try:
        result = algo.train()  # one iteration: each Learner's step, then the driver's mean
        states = [ref.get() for ref in algo.learner_group.foreach_learner(lambda learner: learner.constraint_state())]
    finally:
        algo.stop()
    assert len(states) == 2 and states[0]["lambdas"] == states[1]["lambdas"] and states[0]["lambdas"][0] > 0.5
    assert result["rlhf"]["constraint/length<=2/lambda"] > 0


def test_bad_input_says_what_to_do(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PPO only"):
        rllib_config(tiny_config(tiny_model, tmp_path, algo="a2c"))
    with pytest.raises(ValueError, match=">= 0"):
        rllib_config(tiny_config(tiny_model, tmp_path), num_gpus_per_learner=-1)
    with pytest.raises(ValueError, match="--prompt-group runs on --engine sb3 only"):
        rllib_config(tiny_config(tiny_model, tmp_path, prompt_group=2))
    with pytest.MonkeyPatch.context() as patch:  # the same answer on a machine with a GPU
        patch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ValueError, match=r"needs a CUDA GPU here.*leave it at 0"):
            rllib_config(tiny_config(tiny_model, tmp_path), num_gpus_per_learner=1)
        rllib_config(tiny_config(tiny_model, tmp_path), num_learners=1, num_gpus_per_learner=1)  # a cluster's GPUs
    env = make_env(tiny_config(tiny_model, tmp_path), "eval")
    with pytest.raises(ValueError, match="model_config"):
        CausalLMRLModule(observation_space=env.observation_space, action_space=env.action_space, model_config={})


def test_gpu_learners_on_a_cluster_without_gpus_are_refused(local_ray: None, tiny_model: Path, tmp_path: Path) -> None:
    """--num-learners 1 --num-gpus-per-learner 1 on a Ray cluster with no GPU: one line, no run directory (RLlib
    would wait for the GPU for ever)."""
    with pytest.raises(ValueError, match="need 1 GPUs, and the Ray cluster has 0"):
        train_rllib(tiny_config(tiny_model, tmp_path), num_env_runners=0, num_learners=1, num_gpus_per_learner=1)
    assert not any(tmp_path.iterdir())


def test_example_trains_saves_and_exports(tiny_model: Path, tmp_path: Path) -> None:
    """examples/rllib_train.py end to end on the tiny LM (its own local Ray, one EnvRunner)."""
    args = [
        "--model", str(tiny_model), "--reward-model", "gold", "--timesteps", "16", "--n-envs", "2", "--n-steps", "8",
        "--max-new-tokens", "4", "--max-prompt-tokens", "128", "--num-env-runners", "1", "--num-cpus", "2",
        "--save", str(tmp_path / "ckpt"), "--export", str(tmp_path / "lm"),
    ]  # fmt: skip
    example = Path(__file__).parents[1] / "examples" / "rllib_train.py"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(example), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"16 tokens: beta {DEFAULT_BETA:.3f}, episodes 4.000, reward_model_score" in done.stdout
    assert "The film opens with" in done.stdout
    assert (tmp_path / "lm" / "config.json").is_file() and (tmp_path / "ckpt").is_dir()


def test_textgen_train_engine_rllib_passes_the_config_and_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.rllib

    calls = []
    monkeypatch.setattr(agents.rllib, "train_rllib", lambda config, **kw: calls.append((config, kw)))
    main(["train", "--engine", "rllib", "--num-env-runners", "3", "--num-learners", "1", "--beta", "0.2"])
    ((config, kwargs),) = calls
    assert config.beta == 0.2 and config.algo == "ppo"
    assert kwargs == {"num_env_runners": 3, "num_learners": 1, "num_gpus_per_learner": 0}
    with pytest.raises(SystemExit, match="1"):  # --resume is for sb3 runs: a one-line error
        main(["train", "--engine", "rllib", "--resume", "runs/x"])
