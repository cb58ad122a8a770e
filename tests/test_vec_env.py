"""TextGenVecEnv: the SB3 VecEnv contract, equivalence with DummyVecEnv of the single env, batched scoring, PPO."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import pytest
from conftest import TINY_PROMPTS, LengthReward, ReferenceLength
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv

import text_env  # noqa: F401  (registers TextGen-v0)
from text_env.prompts import Example
from text_env.vec_env import TextGenVecEnv, make_text_vec_env

MAX_PROMPT, MAX_NEW = 24, 6  # as in the tiny_env_kwargs fixture
L = MAX_PROMPT + MAX_NEW


class CountingReward:
    """LengthReward that records every ``score`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        self.calls.append((list(prompts), list(completions)))
        return LengthReward().score(prompts, completions)


class FailOnceReward(LengthReward):
    """LengthReward whose first call raises, like a flaky remote judge."""

    def __init__(self) -> None:
        self.failed = False

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if not self.failed:
            self.failed = True
            raise ConnectionError("judge unreachable")
        return super().score(prompts, completions)


def token(venv: TextGenVecEnv, text: str) -> int:
    (token_id,) = venv.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token_id


def random_actions(rng: np.random.Generator, n_envs: int, vocab: int, eos: int) -> np.ndarray:
    """Random token ids, about one in five replaced by EOS so that episodes end at different steps."""
    actions = rng.integers(0, vocab, size=n_envs)
    actions[rng.random(n_envs) < 0.2] = eos
    return actions


# --- the VecEnv contract -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_envs", [1, 3])
def test_vec_env_contract(tiny_env_kwargs: dict, n_envs: int) -> None:
    venv = make_text_vec_env(n_envs, seed=0, **tiny_env_kwargs)
    single = gym.make("TextGen-v0", **tiny_env_kwargs)
    assert isinstance(venv, VecEnv) and venv.num_envs == n_envs
    assert venv.observation_space == single.observation_space
    assert venv.action_space == single.action_space
    obs = venv.reset()
    assert set(obs) == {"input_ids", "attention_mask"}
    for key in obs:
        assert obs[key].shape == (n_envs, L) and obs[key].dtype == np.int64
    assert all(info["prompt"] in TINY_PROMPTS for info in venv.reset_infos)

    a = token(venv, "a")
    for t in range(MAX_NEW):
        obs, rewards, dones, infos = venv.step(np.full(n_envs, a))
        assert rewards.shape == (n_envs,) and rewards.dtype == np.float32
        assert dones.shape == (n_envs,) and dones.dtype == bool
        assert isinstance(infos, list) and len(infos) == n_envs
        for info in infos:
            assert type(info["TimeLimit.truncated"]) is bool
        if t < MAX_NEW - 1:
            assert not dones.any() and (rewards == 0).all()
            assert all("terminal_observation" not in info and not info["TimeLimit.truncated"] for info in infos)
            assert (obs["input_ids"][:, MAX_PROMPT + t] == a).all()
    # every episode reaches the length limit at the same step, which terminates it (no value is bootstrapped after
    # it): terminal observations, then auto-reset
    assert dones.all()
    for i, info in enumerate(infos):
        assert info["TimeLimit.truncated"] is False
        assert info["completion"] == "a" * MAX_NEW
        terminal = info["terminal_observation"]
        assert terminal["input_ids"].shape == (L,) and terminal["attention_mask"].shape == (L,)
        assert (terminal["input_ids"][MAX_PROMPT:] == a).all() and terminal["attention_mask"][MAX_PROMPT:].all()
        assert rewards[i] == pytest.approx(info["reward_model_score"])
        assert venv.reset_infos[i]["completion"] == ""
    assert (obs["attention_mask"][:, MAX_PROMPT:] == 0).all()  # the returned observation is the reset one


def test_vec_env_eos_ends_one_episode(tiny_env_kwargs: dict) -> None:
    venv = make_text_vec_env(3, seed=1, **{**tiny_env_kwargs, "reward_model": LengthReward()})
    venv.reset()
    a, eos = token(venv, "a"), venv.tokenizer.eos_token_id
    venv.step(np.array([a, a, a]))
    obs, rewards, dones, infos = venv.step(np.array([a, eos, a]))
    np.testing.assert_array_equal(dones, [False, True, False])
    assert infos[1]["TimeLimit.truncated"] is False
    assert infos[1]["completion"] == "a" and rewards[1] == pytest.approx(1.0) == infos[1]["reward_model_score"]
    assert infos[1]["terminal_observation"]["input_ids"][MAX_PROMPT + 1] == eos
    assert rewards[0] == rewards[2] == 0.0
    assert "terminal_observation" not in infos[0] and "terminal_observation" not in infos[2]
    assert obs["attention_mask"][1, MAX_PROMPT:].sum() == 0  # env 1 restarted
    assert (obs["attention_mask"][[0, 2], MAX_PROMPT : MAX_PROMPT + 2] == 1).all()  # the others go on


def test_vec_env_step_actions_shape(tiny_env_kwargs: dict) -> None:
    venv = make_text_vec_env(3, seed=0, **tiny_env_kwargs)
    venv.reset()
    with pytest.raises(ValueError, match=r"expected 3 actions \(one token id per env\), got shape \(2,\)"):
        venv.step(np.array([1, 2]))
    with pytest.raises(ValueError, match=r"action 128 is outside the vocabulary"):
        venv.step(np.array([1, 128, 2]))
    with pytest.raises(TypeError, match=r"one integer token id"):
        venv.step(np.array([1.5, 2.0, 3.0]))
    obs, *_ = venv.step(np.array([[4], [5], [6]]))  # (n, 1) is accepted; failed steps appended nothing
    np.testing.assert_array_equal(obs["input_ids"][:, MAX_PROMPT], [4, 5, 6])
    assert (obs["attention_mask"][:, MAX_PROMPT + 1 :] == 0).all()


def test_vec_env_reset_options(tiny_env_kwargs: dict) -> None:
    venv = make_text_vec_env(2, seed=0, **tiny_env_kwargs)
    venv.set_options({"prompt": "a fine film"})
    obs = venv.reset()
    assert [info["prompt"] for info in venv.reset_infos] == ["a fine film"] * 2
    np.testing.assert_array_equal(obs["input_ids"][0], obs["input_ids"][1])
    venv.reset()  # options are used once
    assert all(info["prompt"] in TINY_PROMPTS for info in venv.reset_infos)


@pytest.mark.parametrize("options", [{"promt": "a film"}, [{"prompt": "a film"}, {"seed": 1}]], ids=["dict", "list"])
def test_vec_env_unknown_reset_option(tiny_env_kwargs: dict, options: dict | list) -> None:
    venv = make_text_vec_env(2, seed=0, **tiny_env_kwargs)
    message = r"unknown reset option\(s\) \['(promt|seed)'\]; the allowed keys are \['prompt'\]"
    with pytest.raises(ValueError, match=message):
        venv.set_options(options)
    venv.reset()  # nothing was stored
    assert all(info["prompt"] in TINY_PROMPTS for info in venv.reset_infos)


def test_vec_env_seed_is_deterministic(tiny_env_kwargs: dict) -> None:
    def prompts_after(seed: int) -> list[str]:
        venv = make_text_vec_env(3, **tiny_env_kwargs)
        venv.seed(seed)
        venv.reset()
        seen = [info["prompt"] for info in venv.reset_infos]
        eos = venv.tokenizer.eos_token_id
        for _ in range(4):
            venv.step(np.full(3, eos))
            seen += [info["prompt"] for info in venv.reset_infos]
        return seen

    assert prompts_after(3) == prompts_after(3)
    assert prompts_after(3) != prompts_after(4)


@pytest.mark.parametrize("render_mode", ["ansi", "human"])
def test_vec_env_render(tiny_env_kwargs: dict, render_mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        venv = make_text_vec_env(2, seed=0, render_mode=render_mode, **tiny_env_kwargs)
    assert not [w for w in caught if "render_mode" in str(w.message)]
    assert venv.render_mode == render_mode and venv.metadata["render_modes"] == [render_mode]
    assert venv.get_attr("render_mode") == [render_mode, render_mode]
    venv.reset()
    _, _, _, infos = venv.step(np.full(2, token(venv, "x")))
    texts = [info["prompt"] + "x" for info in infos]
    if render_mode == "ansi":
        assert venv.render() == texts
    else:
        assert venv.render() is None
        assert capsys.readouterr().out == "\n---\n".join(texts) + "\n"


def test_vec_env_attributes(tiny_env_kwargs: dict) -> None:
    venv = make_text_vec_env(3, seed=0, **tiny_env_kwargs)
    assert venv.get_attr("max_new_tokens") == [MAX_NEW] * 3
    assert venv.get_attr("max_prompt_tokens", indices=[0, 2]) == [MAX_PROMPT] * 2
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    assert venv.get_images() == [None] * 3
    assert venv.tokenizer is venv.core.tokenizer and len(venv.tokenizer) == venv.action_space.n


# --- equivalence with DummyVecEnv ------------------------------------------------------------------------------


def assert_obs_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("seed", [0, 11])
def test_equivalent_to_dummy_vec_env(tiny_env_kwargs: dict, seed: int) -> None:
    n_envs = 3
    dummy = DummyVecEnv([lambda: gym.make("TextGen-v0", **tiny_env_kwargs)] * n_envs)
    venv = TextGenVecEnv(n_envs, **tiny_env_kwargs)
    dummy.seed(seed)
    venv.seed(seed)
    assert_obs_equal(dummy.reset(), venv.reset())
    assert [i["prompt"] for i in dummy.reset_infos] == [i["prompt"] for i in venv.reset_infos]

    rng = np.random.default_rng(seed)
    vocab, eos = venv.action_space.n, venv.tokenizer.eos_token_id
    n_done, partial_done_steps, n_terminated, n_truncated = 0, 0, 0, 0
    for _ in range(40):
        actions = random_actions(rng, n_envs, vocab, eos)
        d_obs, d_rewards, d_dones, d_infos = dummy.step(actions)
        v_obs, v_rewards, v_dones, v_infos = venv.step(actions)
        assert_obs_equal(d_obs, v_obs)
        np.testing.assert_array_equal(d_rewards, v_rewards)
        assert d_rewards.dtype == v_rewards.dtype
        np.testing.assert_array_equal(d_dones, v_dones)
        for d_info, v_info in zip(d_infos, v_infos, strict=True):
            for key in ("prompt", "completion", "TimeLimit.truncated"):
                assert d_info[key] == v_info[key], key
            assert ("terminal_observation" in d_info) == ("terminal_observation" in v_info)
            if "terminal_observation" in d_info:
                assert_obs_equal(d_info["terminal_observation"], v_info["terminal_observation"])
                assert d_info["reward_model_score"] == v_info["reward_model_score"]
                assert d_info["gold_score"] == v_info["gold_score"]
                by_length = bool(d_info["terminal_observation"]["attention_mask"][-1])  # a full row
                n_truncated += by_length
                n_terminated += not by_length
        assert [i["prompt"] for i in dummy.reset_infos] == [i["prompt"] for i in venv.reset_infos]
        n_done += int(d_dones.sum())
        partial_done_steps += bool(d_dones.any() and not d_dones.all())
    # the action sequence did exercise what it should: several episodes, ending by EOS and by length, apart
    assert n_done >= 2 * n_envs and partial_done_steps > 0
    assert n_terminated > 0 and n_truncated > 0


# --- SB3's own make_vec_env ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vec_env_cls", [DummyVecEnv, SubprocVecEnv])
def test_sb3_make_vec_env(tiny_env_kwargs: dict, vec_env_cls: type[VecEnv]) -> None:
    """The habitual ``make_vec_env("TextGen-v0", ...)``: SB3 asks for render_mode="rgb_array", which the env declines
    with a TypeError, and SB3 makes it again without one."""
    kwargs = {**tiny_env_kwargs, "reward_model": LengthReward(), "max_new_tokens": 3}
    vec_env_kwargs = {"start_method": "fork"} if vec_env_cls is SubprocVecEnv else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not in the possible render_modes")
        venv = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=kwargs, vec_env_cls=vec_env_cls,
                            vec_env_kwargs=vec_env_kwargs)  # fmt: skip
    try:
        assert venv.get_attr("render_mode") == [None, None]
        obs = venv.reset()
        assert obs["input_ids"].shape == (2, MAX_PROMPT + 3)
        a = venv.get_attr("tokenizer", [0])[0]("a", add_special_tokens=False)["input_ids"][0]
        for t in range(3):
            obs, rewards, dones, infos = venv.step(np.full(2, a))
            assert dones.tolist() == [t == 2] * 2
        assert rewards.tolist() == [1.0, 1.0]  # "aaa": every character is an 'a'
        assert all(info["episode"]["r"] == 1.0 and not info["TimeLimit.truncated"] for info in infos)
    finally:
        venv.close()


# --- batched scoring ---------------------------------------------------------------------------------------------


def test_scoring_is_batched(tiny_env_kwargs: dict) -> None:
    reward = CountingReward()
    venv = make_text_vec_env(3, seed=2, **{**tiny_env_kwargs, "reward_model": reward})
    venv.reset()
    rng = np.random.default_rng(0)
    vocab, eos, a = venv.action_space.n, venv.tokenizer.eos_token_id, token(venv, "a")
    max_batch = 0
    for t in range(30):
        # the first episodes all truncate together; after that, EOS makes them end at different steps
        actions = np.full(3, a) if t < MAX_NEW else random_actions(rng, 3, vocab, eos)
        n_calls = len(reward.calls)
        _, rewards, dones, infos = venv.step(actions)
        new_calls = reward.calls[n_calls:]
        if not dones.any():
            assert new_calls == []
            continue
        assert len(new_calls) == 1  # one call per step, with every episode that ended in it
        prompts, completions = new_calls[0]
        finished = np.flatnonzero(dones)
        assert prompts == [infos[i]["prompt"] for i in finished]
        assert completions == [infos[i]["completion"] for i in finished]
        np.testing.assert_allclose(rewards[finished], LengthReward().score(prompts, completions), rtol=1e-6)
        max_batch = max(max_batch, len(prompts))
    assert max_batch == 3
    assert len(reward.calls) < sum(len(p) for p, _ in reward.calls)  # fewer calls than scored episodes


def test_failing_reward_model_leaves_the_env_usable(tiny_env_kwargs: dict) -> None:
    """A scorer that raises must not leave full rows behind: the next step would write past their end."""
    venv = make_text_vec_env(3, seed=0, **{**tiny_env_kwargs, "reward_model": FailOnceReward()})
    venv.reset()
    a, eos = token(venv, "a"), venv.tokenizer.eos_token_id
    for _ in range(MAX_NEW - 1):
        venv.step(np.full(3, a))
    with pytest.raises(ConnectionError, match="judge unreachable"):
        venv.step(np.array([a, eos, a]))  # rows 0 and 2 truncate, row 1 terminates: all three are scored together
    assert venv.core.n_new.tolist() == [0, 0, 0]  # their next episodes have started
    for _ in range(MAX_NEW - 1):
        _, _, dones, _ = venv.step(np.full(3, a))
        assert not dones.any()
    _, rewards, dones, infos = venv.step(np.full(3, a))
    assert dones.all() and rewards.tolist() == [1.0, 1.0, 1.0]
    assert [info["completion"] for info in infos] == ["a" * MAX_NEW] * 3
    venv.reset()  # and reset works as ever
    assert venv.step(np.full(3, a))[0]["attention_mask"][:, MAX_PROMPT].tolist() == [1, 1, 1]


# --- stock SB3 PPO -------------------------------------------------------------------------------------------------


def test_stock_ppo_runs(tiny_env_kwargs: dict) -> None:
    venv = make_text_vec_env(2, seed=0, **{**tiny_env_kwargs, "reward_model": LengthReward()})
    model = PPO("MultiInputPolicy", venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(32)
    assert model.num_timesteps == 32
    obs = venv.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (2,) and ((actions >= 0) & (actions < venv.action_space.n)).all()
    venv.step(actions)


def test_vec_env_rows_score_their_own_records(tiny_env_kwargs: dict) -> None:
    """Each row's record reaches the batched column-taking scorer in its own place, and each row's ``info``."""
    examples = [Example("the movie was", ("abc",)), Example("great acting and", ("abcdefg",), {"bonus": 1})]
    kwargs = tiny_env_kwargs | {"prompts": examples, "reward_model": ReferenceLength(), "max_new_tokens": 2}
    venv = make_text_vec_env(2, seed=0, **kwargs)
    venv.set_options([{"prompt": e} for e in examples])
    venv.reset()
    assert [info["references"] for info in venv.reset_infos] == [("abc",), ("abcdefg",)]
    assert "meta" not in venv.reset_infos[0] and venv.reset_infos[1]["meta"] == {"bonus": 1}
    dones = np.zeros(2, dtype=bool)
    while not dones.all():
        _, rewards, dones, infos = venv.step(np.array([5, 5]))
    assert rewards.tolist() == [3.0, 8.0]  # len("abc"), len("abcdefg") + 1: both rows in one call, in order
    assert [info["references"] for info in infos] == [("abc",), ("abcdefg",)]


@pytest.mark.parametrize("seed", [3, None])
def test_prompt_groups_answer_the_same_prompts(tiny_env_kwargs: dict, seed: int | None) -> None:
    """prompt_group=2: envs 0-1 and 2-3 draw the same prompt streams, seeded (seed + i // 2) or not, however their
    episodes interleave; the groups' streams differ; a group that does not divide n_envs is refused."""
    venv = make_text_vec_env(4, seed=seed, prompt_group=2, **tiny_env_kwargs)
    assert venv.get_attr("prompt_group") == [2] * 4
    venv.reset()
    streams: list[list[str]] = [[info["prompt"]] for info in venv.reset_infos]
    eos, other = venv.tokenizer.eos_token_id, (venv.tokenizer.eos_token_id + 1) % venv.action_space.n
    for t in range(12):  # env 1 and env 3 end an episode every step, envs 0 and 2 every other step
        actions = np.array([eos if t % 2 else other, eos, eos if t % 2 else other, eos])
        _, _, dones, _ = venv.step(actions)
        for i in np.flatnonzero(dones):
            streams[i].append(venv.reset_infos[i]["prompt"])
    assert streams[0] == streams[1][: len(streams[0])] and streams[2] == streams[3][: len(streams[2])]
    assert streams[1] != streams[3]
    if seed is not None:
        assert venv.seed(seed) == [seed, seed, seed + 1, seed + 1]
    with pytest.raises(ValueError, match="prompt_group must divide n_envs=4"):
        make_text_vec_env(4, prompt_group=3, **tiny_env_kwargs)
