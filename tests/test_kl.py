"""The KL leash: β controllers and the KLPenalty callback's per-token reward shaping in stock SB3 algorithms."""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import as_tensors, lm_kwargs, make_env, unpadded_outputs
from sb3_contrib import TRPO, MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure

from agents.baselines import BagOfTokens
from agents.buffers import EpisodeRolloutBuffer, MaskableEpisodeRolloutBuffer
from agents.kl import DEFAULT_BETA, KLController, KLPenalty, RewardScale
from agents.masks import TopPMask
from agents.policies import CausalLMPolicy, MaskableCausalLMPolicy
from text_env.models import load_causal_lm


class ConstantReward:
    """Every finished episode earns 1: env rewards are non-zero exactly at episode ends."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.ones(len(completions))


class SpreadReward:
    """Scores that vary between completions (their characters' code points mod 10, tenths), on no normalised scale."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([sum(map(ord, c)) % 10 / 10 for c in completions])


class StepRecorder(BaseCallback):
    """Copies of what the callbacks see at each rollout step (placed before and after KLPenalty)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []

    def _on_step(self) -> bool:
        self.steps.append(
            {
                "obs": {k: v.cpu().numpy().copy() for k, v in self.locals["obs_tensor"].items()},
                "actions": np.array(self.locals["actions"]).reshape(-1),
                "log_probs": self.locals["log_probs"].detach().cpu().clone(),
                "rewards": np.array(self.locals["rewards"]),  # a copy: KLPenalty edits the array in place
                "dones": np.array(self.locals["dones"]),
            }
        )
        return True


def log_probs_of(lm: torch.nn.Module, steps: list[dict[str, Any]]) -> np.ndarray:
    """``log lm(a_t | s_t)`` of every recorded step, ``(n_steps, n_envs)``, from plain unpadded forwards."""
    rows = []
    for step in steps:
        logp = torch.log_softmax(unpadded_outputs(lm, step["obs"])[0], -1)  # (n_envs, V)
        rows.append(logp.gather(1, torch.as_tensor(step["actions"])[:, None]).squeeze(1).numpy())
    return np.stack(rows)


def logged(folder: Path, key: str) -> list[float]:
    with (folder / "progress.csv").open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


# --- β ----------------------------------------------------------------------------------------------------------


def test_target_kl_horizon_follows_the_runs_length(tiny_model: Path, tmp_path: Path) -> None:
    """--target-kl's horizon is a twentieth of the run's episodes (a default run: 10240 tokens / 32 per episode / 20
    = 16 episodes, one rollout), so β can move within a run; --kl-horizon sets it; build_run hands it to the
    controller. At Ziegler et al.'s 10,000 a default run moved β by 0.5 %."""
    from agents.run import TrainConfig, build_run, kl_horizon

    assert kl_horizon(TrainConfig()) == 16  # positive-review: 32-token episodes
    assert kl_horizon(TrainConfig(total_timesteps=20480, max_new_tokens=64)) == 16
    assert kl_horizon(TrainConfig(kl_horizon=500)) == 500
    with pytest.raises(ValueError, match="kl_horizon must be at least 1 episode"):
        TrainConfig(kl_horizon=0)
    config = TrainConfig(model=str(tiny_model), reward_model="gold", n_envs=2, n_steps=4, batch_size=8,
                         max_new_tokens=8, max_prompt_tokens=128, eval_prompts=1, bf16=False, total_timesteps=640,
                         target_kl=1.0, out=str(tmp_path))  # fmt: skip
    controller = build_run(config, verbose=0).kl.controller
    assert (controller.target, controller.horizon) == (1.0, 4)  # 640 / 8 / 20
    for _ in range(20):  # 20 rollouts of 2 episodes at twice the target: β grows by (1 + 0.2·2/4)^20 = 6.7x
        controller.update(2.0, 2)
    assert controller.beta == pytest.approx(DEFAULT_BETA * 1.1**20)


def test_fixed_controller_stays_fixed() -> None:
    controller = KLController(beta=0.1)
    for kl in (0.0, 0.5, 50.0, 1e6):
        assert controller.update(kl, n_episodes=100) == 0.1
    with pytest.raises(ValueError, match="beta"):
        KLController(beta=-0.1)


def test_adaptive_controller() -> None:
    controller = KLController(beta=0.1, target=2.0, horizon=100)
    beta = controller.update(2.2, n_episodes=10)  # 10% over target: error 0.1, times 10/100 episodes
    assert beta == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert controller.update(40.0, n_episodes=10) == pytest.approx(beta * (1 + 0.2 * 0.1))  # error clipped to +0.2
    beta = controller.beta
    assert controller.update(1.0, n_episodes=10) == pytest.approx(beta * (1 - 0.2 * 0.1))  # error -0.5 -> -0.2
    beta = controller.beta
    assert controller.update(0.0, n_episodes=50) == pytest.approx(beta * (1 - 0.2 * 0.5))  # more episodes: more
    beta = controller.beta
    assert controller.update(2.0, n_episodes=10) == beta  # on target
    assert controller.update(9.0, n_episodes=0) == beta  # nothing measured


# --- the callback -----------------------------------------------------------------------------------------------


def run_one_rollout(model: Any, penalty: KLPenalty, folder: Path) -> tuple[StepRecorder, StepRecorder]:
    """One rollout (and its update) with recorders around the penalty; the logger writes CSV to ``folder``."""
    before, after = StepRecorder(), StepRecorder()
    model.set_logger(configure(str(folder), ["csv"]))
    model.learn(model.n_steps * model.n_envs, callback=CallbackList([before, penalty, after]), log_interval=1)
    return before, after


def completed_kl(kl: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """Each finished episode's KL, summed over its tokens, from a rollout's per-token KL and dones ``(n_steps,
    n_envs)`` (episodes still running at the rollout's end are not finished)."""
    totals, running = [], np.zeros(kl.shape[1])
    for step_kl, ended in zip(kl, dones, strict=True):
        running += step_kl
        totals += running[ended].tolist()
        running[ended] = 0
    return np.array(totals)


def winsorised_std(rewards: Any, trim: float = 0.05) -> float:
    rewards = np.asarray(rewards, dtype=np.float64)
    return float(np.clip(rewards, *np.quantile(rewards, [trim, 1 - trim])).std())


def test_reward_scale_is_the_winsorised_std_of_base_rewards() -> None:
    scale = RewardScale(min_std=0.01)
    assert scale.scale == 1.0 and not scale.measured  # nothing measured yet
    assert scale.measure([0.0, 0.2, 0.0, 0.2]) == pytest.approx(0.1, rel=1e-6)  # two values: their plain std
    assert scale.scale == pytest.approx(0.1, rel=1e-6) and scale.measured
    resumed = RewardScale()
    resumed.load_state(json.loads(json.dumps(scale.state())))  # a checkpoint's JSON round trip
    assert resumed.scale == scale.scale
    assert RewardScale(min_std=0.01).measure([0.0, 0.0, 0.0]) == 0.01  # no spread: not blown up
    # a rare penalty far below the rest does not set the divisor: 2 of 40 replies at -1, the rest spread 0.05
    ordinary = np.random.default_rng(0).normal(0.1, 0.05, 38)
    assert RewardScale().measure([-1.0, -1.0, *ordinary]) == pytest.approx(0.05, rel=0.25)
    assert np.std([-1.0, -1.0, *ordinary]) > 0.2
    window = RewardScale()  # a checkpoint of the running form: a window of recent rewards, resumed fixed at its spread
    window.load_state({"recent": [0.0, 0.2, 0.0, 0.2]})
    assert window.scale == pytest.approx(0.1, rel=1e-6)
    old = RewardScale()  # and before the window: running mean, variance and count
    old.load_state({"mean": 0.3, "var": 0.04, "count": 50.0})
    assert old.scale == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least 2 rewards"):
        RewardScale().measure([0.5])
    for bad in ({"min_std": 0}, {"trim": 0.5}):
        with pytest.raises(ValueError, match=r"min_std > 0 and 0 <= trim < 0\.5"):
            RewardScale(**bad)


def test_scaled_rewards_are_divided_by_the_base_policys_spread(
    tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path
) -> None:
    """With scale_rewards, each episode's reward reaches the advantages divided by the winsorised std of the base
    policy's rewards, measured once when training starts (``base_rewards``), and the KL penalty is subtracted after;
    the env's rewards are left alone. Rewards whose spread shrinks later (a sharpening policy) leave the divisor, and
    so the effective β·s, where it was."""
    venv = make_env(tiny_env_kwargs, 4, reward_model=SpreadReward())
    model = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, seed=0, gamma=0.0,
                policy_kwargs=lm_kwargs(tiny_model), rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip
    with torch.no_grad():  # away from the reference, so that the penalty is not zero
        for p in model.policy.lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    compute = type(model.rollout_buffer).compute_returns_and_advantage
    seen: list[np.ndarray] = []

    def spy(buffer: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(buffer.rewards.copy())
        compute(buffer, *args, **kwargs)

    base = np.array([0.0, 0.3, 0.6, 0.9, 0.3, 0.6])
    calls: list[int] = []
    penalty = KLPenalty(beta=0.5, scale_rewards=True, base_rewards=lambda: calls.append(1) or base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.rollout_buffer), "compute_returns_and_advantage", spy)
        before, after = run_one_rollout(model, penalty, tmp_path)
    std = winsorised_std(base)
    env_rewards = np.stack([s["rewards"] for s in before.steps])  # (n_steps, n_envs)
    dones = np.stack([s["dones"] for s in before.steps])
    assert dones.sum() >= 4 and winsorised_std(env_rewards[dones]) != pytest.approx(std)  # not the rollout's own
    log_pi = np.stack([s["log_probs"].numpy() for s in before.steps])
    kl = log_pi - log_probs_of(load_causal_lm(tiny_model), before.steps)
    assert np.abs(kl).mean() > 1e-2
    np.testing.assert_allclose(seen[0], env_rewards / std - 0.5 * kl, atol=2e-5)
    np.testing.assert_allclose(logged(tmp_path, "rlhf/reward_scale"), [std], rtol=1e-4)
    np.testing.assert_allclose(np.stack([s["rewards"] for s in after.steps]), env_rewards)  # untouched per step
    assert penalty.state()["reward_scale"] == {"scale": pytest.approx(std)} and calls == [1]

    model.env.set_attr("reward_model", ConstantReward())  # the spread falls to 0: the divisor stays
    model.learn(model.n_steps * model.n_envs, callback=penalty, reset_num_timesteps=False)
    assert penalty.reward_scale is not None and penalty.reward_scale.scale == pytest.approx(std) and calls == [1]
    with pytest.raises(ValueError, match="pass base_rewards"):
        model.learn(32, callback=KLPenalty(scale_rewards=True))


@pytest.mark.parametrize("engine", ["sb3", "rllib"])
def test_kl_per_episode_sums_an_episode_over_every_rollout_it_spans(
    tiny_model: Path, tmp_path: Path, engine: str
) -> None:
    """A constant per-token KL c, episodes of max_new_tokens = 4 x n_steps (code: 128 tokens, 32 per rollout): the
    logged KL per episode is c x 16 at every rollout where episodes ended (and is not logged in between), and the
    adaptive β is moved by that figure, in SB3 and in RLlib alike. (It was the rollout's KL divided by the episodes
    that ended in it: 8c at 3 rollouts in 4, 4c at the 4th.)"""
    from agents.run import TrainConfig

    c, n_steps, length = 0.25, 4, 16
    config = TrainConfig(
        model=str(tiny_model), reward_model="gold", n_envs=2, n_steps=n_steps, batch_size=8, n_epochs=1,
        max_new_tokens=length, max_prompt_tokens=128, eval_prompts=1, bf16=False, total_timesteps=64,
        reward_scaling="none", out=str(tmp_path),
    )  # fmt: skip
    if engine == "sb3":
        logged_kl, betas = _constant_kl_sb3(config, c, tmp_path)
    else:
        pytest.importorskip("ray")
        logged_kl, betas = _constant_kl_rllib(config, c)
    assert logged_kl == pytest.approx([c * length] * 2, rel=1e-5)  # 2 envs x 64 steps: 2 rounds of 2 episodes
    assert betas[-1] == pytest.approx(DEFAULT_BETA)  # no target_kl: β fixed


def _a_token(config: Any) -> int:
    """A token that is neither EOS nor part of a stop string: the episodes run to the length limit."""
    from text_env.models import load_tokenizer

    return load_tokenizer(config.model)("a", add_special_tokens=False)["input_ids"][0]


def _constant_kl_sb3(config: Any, c: float, folder: Path) -> tuple[list[float], list[float]]:
    from agents.run import build_run

    run = build_run(config, verbose=0)
    policy, token = run.algo.policy, _a_token(config)
    forward = policy.forward

    def constant(obs: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        actions, values, _ = forward(obs, *args, **kwargs)
        return torch.full_like(actions, token), values, torch.full(actions.shape, c)  # log π = c

    policy.forward = constant  # type: ignore[method-assign]
    run.kl.reference_log_prob = lambda obs, actions: torch.zeros(len(actions))  # type: ignore[method-assign]
    run.algo.set_logger(configure(str(folder), ["csv"]))
    run.algo.learn(config.total_timesteps, callback=run.callbacks())
    return logged(folder, "rlhf/kl_per_episode"), logged(folder, "rlhf/beta")


def _constant_kl_rllib(config: Any, c: float) -> tuple[list[float], list[float]]:
    import ray
    from ray.rllib.core.columns import Columns

    from agents.rllib import CausalLMRLModule, connect_ray, rllib_config
    from agents.rllib.module import REF_LOGP

    token = _a_token(config)
    explore = CausalLMRLModule._forward_exploration

    def constant(self: Any, batch: Any, **kwargs: Any) -> dict[str, Any]:
        out = explore(self, batch, **kwargs)
        n = out[Columns.ACTIONS].shape[0]
        return {**out, Columns.ACTIONS: torch.full((n,), token), Columns.ACTION_LOGP: torch.full((n,), c),
                REF_LOGP: torch.zeros(n)}  # fmt: skip

    started = connect_ray("local", num_cpus=2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(CausalLMRLModule, "_forward_exploration", constant)
            algo = rllib_config(config, num_env_runners=0).build_algo()  # samples in this process: patched
            try:
                rows = [algo.train()["rlhf"] for _ in range(config.total_timesteps // (config.n_envs * config.n_steps))]
            finally:
                algo.stop()
    finally:
        if started:
            ray.shutdown()
    return [r["kl_per_episode"] for r in rows if r["episodes"]], [r["beta"] for r in rows]


def test_penalty_is_zero_for_a_policy_equal_to_its_reference(
    tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path
) -> None:
    venv = make_env(tiny_env_kwargs, 4, reward_model=ConstantReward())
    model = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, seed=0,
                policy_kwargs=lm_kwargs(tiny_model), rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip
    before, after = run_one_rollout(model, KLPenalty(beta=1.0), tmp_path)
    env_rewards = np.stack([s["rewards"] for s in before.steps])
    assert env_rewards.sum() > 0  # episodes did end and pay
    np.testing.assert_allclose(np.stack([s["rewards"] for s in after.steps]), env_rewards, atol=1e-6)
    assert abs(logged(tmp_path, "rlhf/kl_per_token")[0]) < 1e-6
    assert logged(tmp_path, "rlhf/beta") == [1.0]


PENALTY_CASES = [  # (algorithm, policy, buffer, LoRA): every on-policy algorithm, with and without adapters
    pytest.param(PPO, CausalLMPolicy, EpisodeRolloutBuffer, None, id="ppo"),
    pytest.param(PPO, CausalLMPolicy, EpisodeRolloutBuffer, {"r": 4}, id="ppo-lora"),
    pytest.param(PPO, CausalLMPolicy, None, None, id="ppo-stock-buffer"),
    pytest.param(A2C, CausalLMPolicy, EpisodeRolloutBuffer, None, id="a2c"),
    pytest.param(TRPO, CausalLMPolicy, EpisodeRolloutBuffer, None, id="trpo"),
    pytest.param(MaskablePPO, MaskableCausalLMPolicy, MaskableEpisodeRolloutBuffer, {"r": 4}, id="maskable-ppo-lora"),
]


def test_prompt_groups_subtract_the_mean_of_the_other_answers(
    tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path
) -> None:
    """With prompt_group=2 the k-th episodes of envs 0-1 (and of 2-3) answer one prompt, and each reaches the
    advantages less the mean reward of its group's other k-th answers finished by the rollout's end (RLOO's baseline,
    by hand here); an answer whose peer is still running keeps its reward; the env's rewards are left alone."""
    venv = make_env(tiny_env_kwargs, 4, reward_model=SpreadReward(), prompt_group=2)
    model = PPO(CausalLMPolicy, venv, n_steps=16, batch_size=64, n_epochs=1, seed=0, gamma=0.0,
                policy_kwargs=lm_kwargs(tiny_model), rollout_buffer_class=EpisodeRolloutBuffer)  # fmt: skip
    compute = type(model.rollout_buffer).compute_returns_and_advantage
    seen: list[np.ndarray] = []

    def spy(buffer: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(buffer.rewards.copy())
        compute(buffer, *args, **kwargs)

    penalty = KLPenalty(beta=0.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.rollout_buffer), "compute_returns_and_advantage", spy)
        before, after = run_one_rollout(model, penalty, tmp_path)
    env_rewards = np.stack([s["rewards"] for s in before.steps])  # (n_steps, n_envs)
    answers: dict[tuple[int, int], dict[int, tuple[int, float]]] = {}  # (group, k) -> env -> (step, reward)
    finished = [0] * 4
    for t, step in enumerate(before.steps):
        for i in np.flatnonzero(step["dones"]):
            answers.setdefault((i // 2, finished[i]), {})[i] = (t, env_rewards[t, i])
            finished[i] += 1
    expected, baselines = env_rewards.copy(), []
    for members in answers.values():
        for i, (t, _) in members.items():
            peers = [r for j, (_, r) in members.items() if j != i]
            if peers:
                baselines.append(np.mean(peers))
                expected[t, i] -= baselines[-1]
    assert len(baselines) >= 4 and len(baselines) < sum(finished)  # some answers had a peer, some not yet
    np.testing.assert_allclose(seen[0], expected, atol=1e-6)
    np.testing.assert_allclose(np.stack([s["rewards"] for s in after.steps]), env_rewards)  # untouched per step
    assert logged(tmp_path, "rlhf/prompt_baseline_share") == [pytest.approx(len(baselines) / sum(finished))]
    assert penalty.prompt_baseline is not None and penalty.prompt_baseline.group == 2


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers, via peft
@pytest.mark.parametrize("beta", [0.5, 0.0])
@pytest.mark.parametrize("envs_per_pass", [None, 3], ids=["one-pass", "passes-of-3"])  # 4 envs: 3 + a partial 1
@pytest.mark.parametrize(("algo", "policy_class", "buffer_class", "lora"), PENALTY_CASES)
def test_penalty_shapes_rewards(
    tiny_env_kwargs: dict,
    tiny_model: Path,
    tmp_path: Path,
    beta: float,
    envs_per_pass: int | None,
    algo: type,
    policy_class: type,
    buffer_class: type | None,
    lora: dict | None,
) -> None:
    """The rewards SB3 computes advantages from are the env's minus β·(log π − log π_ref) at every step: the
    reference's log-probs of a finished rollout, computed in one pass per episode, equal a per-step reference
    decode's (the KV-cached reference the penalty ran beside every policy step before) and plain forwards'."""
    venv: Any = make_env(tiny_env_kwargs, 4, reward_model=ConstantReward())
    if algo is MaskablePPO:
        venv = TopPMask(venv, tiny_model, top_p=0.9, bf16=False)
    # gamma=0: SB3 adds gamma·V(terminal) to truncated steps' rewards, which would blur the comparison
    extra = {} if algo is A2C else {"batch_size": 32}
    model = algo(policy_class, venv, n_steps=8, gamma=0.0, seed=0, rollout_buffer_class=buffer_class,
                 policy_kwargs=lm_kwargs(tiny_model, lora=lora), **extra)  # fmt: skip
    if algo in (PPO, MaskablePPO):
        model.n_epochs = 1
    with torch.no_grad():
        for p in model.policy.lm.parameters():  # the trained weights (LoRA's B starts at zero; its base is the
            if p.requires_grad:  # reference and stays)
                p.add_(0.1 * torch.randn_like(p))
    rollout_lm = copy.deepcopy(model.policy.lm)  # the weights the rollout runs with (training comes after it)
    compute = type(model.rollout_buffer).compute_returns_and_advantage
    seen: list[np.ndarray] = []  # the rewards returns and advantages are computed from
    penalty = KLPenalty(beta=beta, envs_per_pass=envs_per_pass)

    def spy(buffer: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(buffer.rewards.copy())
        compute(buffer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.rollout_buffer), "compute_returns_and_advantage", spy)
        before, after = run_one_rollout(model, penalty, tmp_path)

    log_pi = np.stack([s["log_probs"].numpy() for s in before.steps])  # (n_steps, n_envs) what the policy stored
    if algo is not MaskablePPO:  # (which samples from the top-p-masked, renormalised distribution)
        np.testing.assert_allclose(log_pi, log_probs_of(rollout_lm, before.steps), atol=1e-5)
    log_ref = log_probs_of(load_causal_lm(tiny_model), before.steps)
    kl = log_pi - log_ref
    assert np.abs(kl).mean() > 1e-2  # the perturbed policy really differs from its reference
    env_rewards = np.stack([s["rewards"] for s in before.steps])
    expected = env_rewards - beta * kl
    np.testing.assert_allclose(seen[0], expected, atol=2e-5)
    np.testing.assert_allclose(model.rollout_buffer.rewards, expected, atol=2e-5)
    np.testing.assert_allclose(np.stack([s["rewards"] for s in after.steps]), env_rewards)  # untouched per step
    # the per-step reference the penalty used to run: the policy's KV-cached reference_log_prob at each step
    policy = model.policy
    policy.set_training_mode(False)
    with torch.no_grad():
        per_step = np.stack([
            policy.reference_log_prob(as_tensors(s["obs"]), torch.as_tensor(s["actions"])).numpy()
            for s in before.steps
        ])  # fmt: skip
    np.testing.assert_allclose(per_step, log_ref, atol=1e-5)
    np.testing.assert_allclose(logged(tmp_path, "rlhf/kl_per_token"), [kl.mean()], atol=1e-5)
    dones = np.stack([s["dones"] for s in before.steps])  # (n_steps, n_envs)
    np.testing.assert_allclose(
        logged(tmp_path, "rlhf/kl_per_episode"), [completed_kl(kl, dones).mean()], rtol=1e-4, atol=1e-5
    )
    assert "compute_returns_and_advantage" not in vars(model.rollout_buffer)  # the hook goes with training


def test_the_kl_floor_of_filtered_sampling_is_logged_beside_the_kl(
    tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path
) -> None:
    """With top_p < 1 the policy samples from a renormalised nucleus, which is KL(π_f‖π) = -log(kept mass) away from
    its unfiltered self before any update: the penalty's estimate cannot fall below it, and it is logged beside."""
    venv = make_env(tiny_env_kwargs, 4)
    model = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, seed=0,
                policy_kwargs=lm_kwargs(tiny_model, top_p=0.5))  # fmt: skip
    run_one_rollout(model, KLPenalty(beta=0.1), tmp_path)
    (floor,) = logged(tmp_path, "rlhf/sampling_kl_floor")
    (kl,) = logged(tmp_path, "rlhf/kl_per_token")
    assert 0 < floor <= np.log(2) + 1e-6 and kl == pytest.approx(floor, rel=0.02)  # the policy is its reference
    plain = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, seed=0, policy_kwargs=lm_kwargs(tiny_model))
    run_one_rollout(plain, KLPenalty(beta=0.1), tmp_path / "plain")
    assert logged(tmp_path / "plain", "rlhf/sampling_kl_floor") == []


def test_adaptive_beta_rises_when_kl_is_over_target(tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path) -> None:
    venv = make_env(tiny_env_kwargs, 4)
    model = PPO(CausalLMPolicy, venv, n_steps=8, batch_size=32, n_epochs=1, policy_kwargs=lm_kwargs(tiny_model))
    with torch.no_grad():
        for p in model.policy.lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    penalty = KLPenalty(beta=0.1, target_kl=1e-4, horizon=10)
    run_one_rollout(model, penalty, tmp_path)
    assert penalty.controller.beta > 0.1
    assert penalty.state() == {"beta": penalty.controller.beta, "target": 1e-4, "horizon": 10}


def test_penalty_with_an_external_reference(tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path) -> None:
    """A policy without an LM prior is leashed to the LM named by ``reference``."""
    venv = make_env(tiny_env_kwargs, 4, reward_model=ConstantReward())
    model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, n_epochs=1, gamma=0.0, seed=0,
                policy_kwargs=dict(features_extractor_class=BagOfTokens))  # fmt: skip
    before, after = run_one_rollout(model, KLPenalty(beta=0.5, reference=str(tiny_model)), tmp_path)
    log_pi = np.stack([s["log_probs"].numpy() for s in before.steps])
    kl = log_pi - log_probs_of(load_causal_lm(tiny_model), before.steps)
    np.testing.assert_allclose(  # the per-step rewards are the env's: the penalty goes into the buffer
        np.stack([s["rewards"] for s in after.steps]), np.stack([s["rewards"] for s in before.steps])
    )
    assert np.abs(kl).max() > 1e-3
    expected = np.stack([s["rewards"] for s in before.steps]) - 0.5 * kl
    np.testing.assert_allclose(model.rollout_buffer.rewards, expected, atol=2e-5)


@pytest.mark.parametrize("algo", ["ppo_bag_of_tokens", "recurrent_ppo_lstm"])
def test_no_value_is_bootstrapped_after_a_finished_completion(
    tiny_env_kwargs: dict, tiny_model: Path, tmp_path: Path, algo: str
) -> None:
    """The length limit ends the episode (terminated): SB3 adds no γ·V(s) to the last reward of a completion, so a
    baseline whose value net says 5 everywhere leaves every buffer reward at the env's minus β·KL (γ = 1, as in
    ``textgen train``). Before, a completion that reached ``max_new_tokens`` was "truncated" and got +5."""
    from stable_baselines3.common.logger import configure

    from agents.run import TrainConfig, build_run

    config = TrainConfig.for_algo(
        algo, model=str(tiny_model), reward_model="gold", n_envs=4, n_steps=8, batch_size=32, max_new_tokens=4,
        max_prompt_tokens=128, eval_prompts=1, bf16=False, gamma=1.0, beta=0.5, total_timesteps=32,
    )  # fmt: skip
    run = build_run(config, verbose=0)
    value_net = run.algo.policy.value_net
    with torch.no_grad():
        value_net.weight.zero_()
        value_net.bias.fill_(5.0)
    before = StepRecorder()
    kls: list[np.ndarray] = []
    penalise = run.kl.penalise
    run.kl.penalise = lambda buffer: kls.append(penalise(buffer)) or kls[-1]  # type: ignore[method-assign]
    run.algo.set_logger(configure(str(tmp_path), ["csv"]))
    run.algo.learn(32, callback=CallbackList([before, run.kl]))
    env_rewards = np.stack([s["rewards"] for s in before.steps])  # (n_steps, n_envs)
    dones = np.stack([s["dones"] for s in before.steps])
    assert dones.sum() >= 4  # 8 steps of episodes of at most 4 tokens
    expected = env_rewards - 0.5 * kls[0]
    np.testing.assert_allclose(run.algo.rollout_buffer.rewards[dones], expected[dones], atol=1e-5)


def test_penalty_defaults_to_the_env_model(tiny_env_kwargs: dict, tiny_model: Path) -> None:
    model = PPO("MultiInputPolicy", make_env(tiny_env_kwargs, 2), n_steps=4, batch_size=8,
                policy_kwargs=dict(features_extractor_class=BagOfTokens))  # fmt: skip
    penalty = KLPenalty()
    model.learn(8, callback=penalty)
    assert penalty.reference == str(tiny_model) and penalty._reference_lm is not None


def test_penalty_without_any_reference_explains(tiny_env_kwargs: dict) -> None:
    from stable_baselines3.common.env_util import make_vec_env

    model = PPO("MlpPolicy", make_vec_env("CartPole-v1", 1), n_steps=4, batch_size=4)
    with pytest.raises(TypeError, match=r"has no reference model and the env names no LM: pass KLPenalty\(reference="):
        model.learn(4, callback=KLPenalty())
