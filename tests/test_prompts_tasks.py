"""Prompt sources and rendering, the task registry, the positive-review task and its VADER gold scorer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from text_env import tasks
from text_env.models import load_tokenizer
from text_env.prompts import Example, columns_of, encode_prompt, load_examples, load_prompts, render_prompt
from text_env.rewards import call_scorer, scorer_name
from text_env.rewards.gold import VaderSentiment
from text_env.tasks import Task, get_task, list_tasks, positive_review, register_task

PROMPTS = ["the movie was", "i loved the film and", "a sad , dull"]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- load_prompts --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [list, tuple])
def test_load_prompts_from_sequence(kind: type) -> None:
    source = kind(PROMPTS)
    prompts = load_prompts(source)
    assert prompts == PROMPTS and isinstance(prompts, list)
    assert prompts is not source


def test_load_prompts_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="a prompt list must hold only strings"):
        load_prompts(["ok", 3])


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_load_prompts_from_txt(tmp_path: Path, as_path: bool) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("the movie was\n\n  \ni loved the film and\na sad , dull", encoding="utf-8")
    assert load_prompts(path if as_path else str(path)) == PROMPTS  # blank lines are skipped


@pytest.mark.parametrize("field", ["prompt", "text"])
def test_load_prompts_from_jsonl(tmp_path: Path, field: str) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{field: p, "id": i} for i, p in enumerate(PROMPTS)])
    with path.open("a", encoding="utf-8") as f:
        f.write("\n")  # a trailing blank line is fine
    assert load_prompts(path) == PROMPTS


def test_load_prompts_jsonl_custom_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": p, "prompt": "not this"} for p in PROMPTS])
    assert load_prompts(path, column="query") == PROMPTS


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "unclosed"', "not valid JSON"),
        ('{"title": "no prompt field"}', "expected an object with a string field 'prompt' or 'text'"),
        ('["a", "list"]', "expected an object"),
        ('{"prompt": 5}', "expected an object"),
    ],
    ids=["json", "no-field", "not-object", "not-string"],
)
def test_load_prompts_malformed_jsonl(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"prompt": "fine"}}\n\n{bad_line}\n{{"prompt": "also fine"}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        load_prompts(path)


def test_load_prompts_hf_local_dataset(tmp_path: Path, monkeypatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "data.jsonl", [{"prompt": p, "label": i} for i, p in enumerate(PROMPTS)])
    assert load_prompts(f"hf:{data}") == PROMPTS
    assert (tmp_path / "hf-cache").is_dir()  # through the real datasets loader (kept out of ~/.cache)
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['prompt', 'label'\]"):
        load_prompts(f"hf:{data}", column="text")
    write_jsonl(data / "data.jsonl", [{"prompt": p, "summary": f"s{i}"} for i, p in enumerate(PROMPTS)])
    examples = load_examples(f"hf:{data}", reference_column="summary")
    assert examples == [Example(p, (f"s{i}",)) for i, p in enumerate(PROMPTS)]


def test_load_examples_jsonl_reference_column(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "doc one", "summary": "one"}, {"text": "doc two", "summary": ["two", "2"], "other": 1}]
    write_jsonl(path, rows)
    assert load_examples(path, reference_column="summary") == [
        Example("doc one", ("one",)),
        Example("doc two", ("two", "2")),
    ]
    assert load_examples(path) == [Example("doc one"), Example("doc two")]  # no reference column asked: none kept
    assert load_prompts(path) == ["doc one", "doc two"]
    write_jsonl(path, [*rows, {"prompt": "doc three"}])
    with pytest.raises(ValueError, match=r"data\.jsonl:3: no reference field 'summary'"):
        load_examples(path, reference_column="summary")
    write_jsonl(path, [{"prompt": "doc", "summary": 3}])
    with pytest.raises(ValueError, match=r"data\.jsonl:1: a reference must be a string or a list of strings"):
        load_examples(path, reference_column="summary")
    txt = tmp_path / "p.txt"
    txt.write_text("a prompt\n", encoding="utf-8")
    with pytest.raises(ValueError, match="plain text and has no 'summary' column"):
        load_examples(txt, reference_column="summary")


def test_example_record_checks_and_columns() -> None:
    example = Example("doc", ["ref"], {"module": "json"})
    assert example.references == ("ref",) and example.columns() == {"references": ["ref"], "module": "json"}
    assert Example("doc").columns() == {}
    assert columns_of([example, Example("x")]) == {"references": [["ref"], None], "module": ["json", None]}
    assert load_examples(["a", example]) == [Example("a"), example]  # strings and records mix in a list
    with pytest.raises(TypeError, match="sequence of strings"):
        Example("doc", "ref")  # type: ignore[arg-type]  (a bare string would be split into characters)
    with pytest.raises(ValueError, match=r"\['completions', 'references'\] clash"):
        Example("doc", meta={"references": 1, "completions": 2})
    with pytest.raises(ValueError, match="empty or only whitespace"):
        Example("  ")


class _Plain:
    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return np.zeros(len(prompts))


class _AnyColumns:
    def __init__(self) -> None:
        self.seen: dict = {}

    def score(self, prompts: list[str], completions: list[str], **columns: list) -> np.ndarray:
        self.seen = columns
        return np.ones(len(prompts))


def test_call_scorer_passes_each_scorer_the_columns_it_takes() -> None:
    from conftest import ReferenceLength

    columns = columns_of([Example("p", ("abc",), {"bonus": 10, "id": 1}), Example("q", ("de",), {"id": 2})])
    assert call_scorer(_Plain(), ["p", "q"], ["x", "y"], columns).tolist() == [0.0, 0.0]  # no columns: unchanged
    assert call_scorer(ReferenceLength(), ["p", "q"], ["x", "y"], columns).tolist() == [13.0, 2.0]  # its two only
    anything = _AnyColumns()
    call_scorer(anything, ["p", "q"], ["x", "y"], columns)
    assert anything.seen == {"references": [["abc"], ["de"]], "bonus": [10, None], "id": [1, 2]}


def test_scorer_name() -> None:
    assert scorer_name(VaderSentiment()) == "VADER sentiment"
    assert scorer_name(_Plain()) == "_Plain"  # a scorer without a name is labelled by its class


def test_task_keeps_example_records() -> None:
    task = Task("t", [Example("doc", ("ref",)), "plain"], ["held out"], VaderSentiment)
    assert task.train_prompts == ["doc", "plain"] and task.prompts("eval") == ["held out"]
    assert task.examples("train") == [Example("doc", ("ref",)), Example("plain")]
    with pytest.raises(ValueError, match="split must be"):
        task.examples("test")


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_load_prompts_accepts_a_utf8_bom(tmp_path: Path, name: str) -> None:
    lines = PROMPTS if name.endswith(".txt") else [json.dumps({"prompt": p}) for p in PROMPTS]
    path = tmp_path / name
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8-sig")  # as Windows Notepad saves it
    assert load_prompts(path) == PROMPTS


@pytest.mark.parametrize("name", ["prompts.txt", "prompts.jsonl"])
def test_load_prompts_not_utf8_names_file_line_and_byte(tmp_path: Path, name: str) -> None:
    lines = ["the movie was", "a café film"] if name.endswith(".txt") else ['{"prompt": "ok"}', '{"prompt": "café"}']
    path = tmp_path / name
    path.write_bytes("\n".join(lines).encode("latin-1"))
    column = lines[1].index("é") + 1
    message = rf"{re.escape(name)}:2: not UTF-8 text \(byte 0xe9 at column {column}\); save the prompt file as UTF-8"
    with pytest.raises(ValueError, match=message):
        load_prompts(path)


@pytest.mark.parametrize("name", ["prompts", "prompts.txt", "prompts.jsonl"])
def test_load_prompts_directory(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match=rf"prompt file .*{name} is a directory; give a .txt or .jsonl file"):
        load_prompts(tmp_path / name)


@pytest.mark.parametrize(
    ("source", "where"),
    [
        (["the movie was", "", "ok"], "prompt 1 of the list"),
        (["  "], "prompt 0 of the list"),
        ([{"prompt": "ok"}, {"prompt": " \t "}], r"empty\.jsonl:2"),
        ([{"prompt": "ok"}, {"text": ""}], r"empty\.jsonl:2"),
    ],
    ids=["list", "list-whitespace", "jsonl-whitespace", "jsonl-empty"],
)
def test_load_prompts_rejects_empty_prompts(tmp_path: Path, source: list, where: str) -> None:
    given = write_jsonl(tmp_path / "empty.jsonl", source) if isinstance(source[0], dict) else source
    with pytest.raises(ValueError, match=rf"{where}: the prompt is empty or only whitespace"):
        load_prompts(given)


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("empty.txt", "\n \n", ValueError, "no prompts in"),
        ("empty.jsonl", "\n", ValueError, "no prompts in"),
        ("prompts.csv", "a,b\n", ValueError, r"must end in \.txt or \.jsonl"),
        ("missing.txt", None, FileNotFoundError, "does not exist"),
    ],
)
def test_load_prompts_bad_files(tmp_path: Path, name: str, content: str | None, error: type, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=message):
        load_prompts(path)


def test_load_prompts_empty_list() -> None:
    with pytest.raises(ValueError, match=r"no prompts in \[\]"):
        load_prompts([])


# --- rendering -------------------------------------------------------------------------------------------------------


def test_render_prompt_with_chat_template(tiny_chat_model: Path, tiny_model: Path) -> None:
    chat_tok, plain_tok = load_tokenizer(tiny_chat_model), load_tokenizer(tiny_model)
    user_turn = "<s>user: the movie was</s><s>assistant:"
    assert render_prompt(chat_tok, "the movie was") == user_turn
    assert render_prompt(chat_tok, "the movie was", "Review it.") == "<s>user: Review it.</s><s>assistant:the movie was"
    assert render_prompt(chat_tok, "the movie was", "Review it.", chat=False) == "the movie was"
    assert render_prompt(plain_tok, "the movie was", "Review it.") == "the movie was"
    ids = encode_prompt(chat_tok, "the movie was", "Review it.")
    assert ids == chat_tok("<s>user: Review it.</s><s>assistant:the movie was", add_special_tokens=False)["input_ids"]
    assert ids[0] == chat_tok.bos_token_id
    assert encode_prompt(plain_tok, "the movie was") == plain_tok("the movie was")["input_ids"]


# --- the task registry ---------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch) -> None:
    """Let a test register tasks without leaking them into other tests."""
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_BUILT", dict(tasks._BUILT))


def test_get_task_unknown_lists_registered(isolated_registry: None) -> None:
    register_task("zzz-other", lambda: Task("zzz-other", ["a"], ["b"], VaderSentiment))
    registered = "code, concepts, dialogue, positive-review, summarize-docstring, zzz-other"  # sorted, built-ins too
    with pytest.raises(ValueError, match=rf"unknown task 'nope'; registered tasks: {registered}$"):
        get_task("nope")


def test_register_task_builds_once(isolated_registry: None) -> None:
    built = []

    def factory() -> Task:
        built.append(1)
        return Task("mine", ["p1", "p2"], ["p3"], VaderSentiment, max_new_tokens=4, stop_strings=("\n",))

    register_task("mine", factory)
    assert "mine" in list_tasks() and list_tasks() == sorted(list_tasks())
    assert built == []  # lazily
    task = get_task("mine")
    assert get_task("mine") is task and built == [1]
    assert get_task(task) is task  # a Task passes through
    assert task.prompts("train") == ["p1", "p2"] and task.prompts("eval") == ["p3"]
    register_task("mine", factory)  # re-registering rebuilds
    assert get_task("mine") is not task and built == [1, 1]


def test_task_split_and_gold() -> None:
    task = Task("t", ["a"], ["b"], VaderSentiment)
    with pytest.raises(ValueError, match=r"split must be 'train' or 'eval', not 'test'"):
        task.prompts("test")
    assert isinstance(task.gold, VaderSentiment) and task.gold is task.gold  # built once, then shared


def test_env_accepts_registered_task(tiny_env_kwargs: dict, isolated_registry: None) -> None:
    register_task("tiny", lambda: Task("tiny", ["the movie was"], ["a sad , dull"], VaderSentiment, max_new_tokens=2))
    kwargs = {**tiny_env_kwargs, "prompts": None, "max_new_tokens": None}
    env = gym.make("TextGen-v0", task="tiny", split="eval", **kwargs)
    _, info = env.reset(seed=0)
    assert info["prompt"] == "a sad , dull"
    assert env.observation_space["input_ids"].shape == (24 + 2,)  # the task's max_new_tokens


# --- positive-review -------------------------------------------------------------------------------------------------


def test_positive_review_prompts() -> None:
    task = get_task("positive-review")
    assert "positive-review" in list_tasks()
    assert len(task.train_prompts) == 320 and len(task.eval_prompts) == 80
    assert len(set(task.train_prompts)) == 320 and len(set(task.eval_prompts)) == 80
    assert set(task.train_prompts).isdisjoint(task.eval_prompts)
    assert all(isinstance(p, str) and p and "{" not in p for p in task.train_prompts + task.eval_prompts)
    assert task.instruction and task.max_new_tokens == 32 and task.max_prompt_tokens == 72
    rebuilt = positive_review.make_task()  # the split is fixed, not drawn anew
    assert rebuilt.train_prompts == task.train_prompts and rebuilt.eval_prompts == task.eval_prompts


@pytest.mark.parametrize("split", ["train", "eval"])
def test_env_draws_from_split(tiny_model: Path, split: str) -> None:
    env = gym.make(
        "TextGen-v0", model=str(tiny_model), reward_model="gold", split=split, max_new_tokens=2, max_prompt_tokens=128
    )
    allowed = set(get_task("positive-review").prompts(split))
    seen = {env.reset(seed=seed)[1]["prompt"] for seed in range(20)}
    assert seen <= allowed and len(seen) > 1


def test_vader_sentiment() -> None:
    gold = VaderSentiment()
    scores = gold.score(["p1", "p2", "p3"], ["I loved it, wonderful!", "terrible, awful", "the film is 90 minutes"])
    assert scores.shape == (3,) and scores.dtype == np.float64
    assert scores[0] > 0.5 and scores[1] < -0.5 and abs(scores[2]) < 0.1
    assert ((scores >= -1) & (scores <= 1)).all()
    # the prompt is ignored: only the completion is judged
    assert gold.score(["awful awful awful"], ["wonderful"])[0] == gold.score(["great"], ["wonderful"])[0]
    assert gold.score([], []).shape == (0,)
