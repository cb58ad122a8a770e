"""Preference data: the JSONL format (round trip, every kind of malformed line), hf: datasets, and resumable
pair generation with a real (tiny) LM."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import TINY_PROMPTS, LengthReward

from text_env.models import load_causal_lm, load_tokenizer
from text_env.prompts import Example
from text_env.rewards.annotators import SimulatedAnnotator
from text_env.rewards.preferences import (
    PreferencePair,
    append_pairs,
    generate_pairs,
    load_preferences,
    sample_completions,
)

VALID = {"prompt": "p", "chosen": "good", "rejected": "bad"}


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- the JSONL format ----------------------------------------------------------------------------------------


def test_round_trip_with_and_without_margin(tmp_path: Path) -> None:
    pairs = [
        PreferencePair("the movie was", "great", "awful"),
        PreferencePair("ünïcödé 电影 🎬", "très bien 👍", "schlecht\u2028\r\nline", margin=1.5),
        PreferencePair('quotes " and \\ backslash', "", "tab\there", margin=0),
        PreferencePair("p", "c", "r", margin=-2.25),
    ]
    path = tmp_path / "prefs.jsonl"
    append_pairs(path, pairs[:2])
    append_pairs(path, pairs[2:])  # appending keeps what is there
    loaded = load_preferences(path)
    assert loaded == pairs
    assert [p.margin for p in loaded] == [None, 1.5, 0.0, -2.25]
    assert all(isinstance(p.margin, float) for p in loaded[1:])
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert len(lines) == 5 and lines[-1] == ""  # one JSON object a line, each newline-terminated
    assert "margin" not in json.loads(lines[0])  # an unset margin is left out, not written as null
    assert "电影" in lines[1]  # written as UTF-8, not \u escapes
    assert load_preferences(str(path)) == pairs  # a str path works too


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", ["", json.dumps(VALID), "   ", "\t", json.dumps({**VALID, "margin": 2})])
    assert load_preferences(path) == [PreferencePair("p", "good", "bad"), PreferencePair("p", "good", "bad", 2.0)]


def test_extra_fields_are_kept_as_the_examples_meta(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [json.dumps({**VALID, "annotator": "bob", "id": 3})])
    assert load_preferences(path) == [PreferencePair("p", "good", "bad", meta={"annotator": "bob", "id": 3})]


@pytest.mark.parametrize(
    ("bad_line", "what"),
    [
        ('{"prompt": "p", "chosen": "good", "rejected": "bad"', r"not valid JSON"),
        ("not json at all", r"not valid JSON"),
        ('["p", "good", "bad"]', r"expected a JSON object .*got list"),
        ('"just a string"', r"expected a JSON object .*got str"),
        ("null", r"expected a JSON object .*got NoneType"),
        ('{"chosen": "good", "rejected": "bad"}', r"missing field\(s\) prompt"),
        ('{"prompt": "p", "rejected": "bad"}', r"missing field\(s\) chosen"),
        ('{"prompt": "p", "chosen": "good"}', r"missing field\(s\) rejected"),
        ("{}", r"missing field\(s\) prompt, chosen, rejected"),
        ('{"prompt": 3, "chosen": "good", "rejected": "bad"}', r"field 'prompt' must be a string, got int"),
        ('{"prompt": "p", "chosen": null, "rejected": "bad"}', r"field 'chosen' must be a string, got NoneType"),
        ('{"prompt": "p", "chosen": "good", "rejected": ["bad"]}', r"field 'rejected' must be a string, got list"),
        ('{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": "1.0"}', r"'margin' must be a finite"),
        ('{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": NaN}', r"'margin' must be a finite"),
        ('{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": Infinity}', r"'margin' must be a finite"),
        ('{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": true}', r"'margin' must be a finite"),
        ('{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": [1]}', r"'margin' must be a finite"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path: Path, bad_line: str, what: str) -> None:
    # the bad line is line 4: after a valid line, a blank line (still counted) and another valid line
    path = write_lines(tmp_path / "broken.jsonl", [json.dumps(VALID), "", json.dumps(VALID), bad_line, "garbage"])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:4: {what}") as err:
        load_preferences(path)
    assert "broken.jsonl" in str(err.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    for content in ("", "\n\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=r"empty\.jsonl holds no preference pairs"):
            load_preferences(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(IsADirectoryError, match=r"preference file .* is a directory; give a \.jsonl file"):
        load_preferences(tmp_path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_text(json.dumps({**VALID, "chosen": "très bien"}, ensure_ascii=False) + "\n", encoding="utf-8-sig")
    assert load_preferences(path) == [PreferencePair("p", "très bien", "bad")]


def test_latin1_file_names_line_and_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(VALID), json.dumps({**VALID, "chosen": "très bien"}, ensure_ascii=False)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    column = lines[1].index("è") + 1
    message = rf"latin1\.jsonl:2: not UTF-8 text \(byte 0xe8 at column {column}\); save the preference file as UTF-8"
    with pytest.raises(ValueError, match=message):
        load_preferences(path)


def test_hf_dataset_from_local_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # read at import: patch the live value too
    data = tmp_path / "my-prefs"
    data.mkdir()
    pairs = [
        PreferencePair("p1", "good", "bad", 1.0),
        PreferencePair("p2 é", "great", "awful"),
        PreferencePair("p", "a", "b"),
    ]
    append_pairs(data / "data.jsonl", pairs)
    loaded = load_preferences(f"hf:{data}")
    assert loaded == pairs  # rows missing the margin column come back as None, not NaN
    assert cache.is_dir() and any(cache.iterdir())  # the cache went where the test pointed it

    write_lines(data / "data.jsonl", [json.dumps(VALID), json.dumps({**VALID, "chosen": 5})])
    with pytest.raises(ValueError, match=r"hf:.*my-prefs row 1: field 'chosen' must be a string"):
        load_preferences(f"hf:{data}")


# --- sampling and generating pairs with the tiny LM ---------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_model: Path) -> tuple:
    return load_causal_lm(tiny_model), load_tokenizer(tiny_model)


def test_sample_completions_shape(lm: tuple) -> None:
    model, tokenizer = lm
    prompts = TINY_PROMPTS[:3]
    samples = sample_completions(model, tokenizer, prompts, max_new_tokens=3, n=3, batch_size=4, progress=False)
    assert len(samples) == len(prompts)
    assert all(len(s) == 3 and all(isinstance(c, str) for c in s) for s in samples)
    # sampled, not greedy: 9 random 3-token texts from a random LM are not all the same
    assert len({c for s in samples for c in s}) > 1


class CountingAnnotator:
    """A simulated annotator that records how many pairs it was asked about and can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.inner = SimulatedAnnotator(LengthReward(), beta=10.0, seed=0)
        self.asked: list[str] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def label(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[PreferencePair]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("annotator went home")
        self.asked += prompts
        return self.inner.label(prompts, a, b)


def generate(lm: tuple, out: Path, n: int, annotator: CountingAnnotator, batch_size: int = 1) -> list:
    model, tokenizer = lm
    return generate_pairs(model, tokenizer, TINY_PROMPTS, annotator, out, n, max_new_tokens=3, batch_size=batch_size)


def test_generate_pairs_writes_n_and_resumes(lm: tuple, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    first = CountingAnnotator()
    pairs = generate(lm, out, 4, first, batch_size=2)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(pairs) == len(lines) == 4 and load_preferences(out) == pairs
    assert all(p.prompt in TINY_PROMPTS for p in pairs)
    assert sorted(first.asked) == sorted(TINY_PROMPTS)  # 4 pairs over 4 prompts: each prompt once

    second = CountingAnnotator()
    more = generate(lm, out, 8, second, batch_size=2)
    new_lines = out.read_text(encoding="utf-8").splitlines()
    assert len(more) == len(new_lines) == 8
    assert new_lines[:4] == lines  # the first four are untouched
    assert len(second.asked) == 4  # only the missing pairs were sampled and labelled
    assert sorted(p.prompt for p in more) == sorted(TINY_PROMPTS * 2)  # prompts stay balanced across the resume

    # the resumed run used the same prompt sequence as one uninterrupted run of 8
    straight = generate(lm, tmp_path / "straight.jsonl", 8, CountingAnnotator(), batch_size=2)
    assert [p.prompt for p in straight] == [p.prompt for p in more]

    third = CountingAnnotator()
    assert len(generate(lm, out, 8, third)) == 8 and third.calls == 0  # nothing left to do
    assert out.read_text(encoding="utf-8").splitlines() == new_lines


def test_generate_pairs_interrupted_keeps_every_label(lm: tuple, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    # batch_size=1: sampled in chunks of 4 pairs, labelled one pair at a time; the 6th label (in chunk 2) fails
    with pytest.raises(KeyboardInterrupt):
        generate(lm, out, 10, CountingAnnotator(fail_on_call=6), batch_size=1)
    kept = out.read_text(encoding="utf-8").splitlines()
    assert len(kept) == 5 and len(load_preferences(out)) == 5

    resumed = CountingAnnotator()
    pairs = generate(lm, out, 10, resumed, batch_size=1)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(pairs) == len(lines) == 10 and lines[:5] == kept
    assert resumed.calls == 5 and len(resumed.asked) == 5  # one pair a call, nothing redone
    straight = generate(lm, tmp_path / "straight.jsonl", 10, CountingAnnotator(), batch_size=1)
    assert [p.prompt for p in straight] == [p.prompt for p in pairs]  # the same prompts, none lost or repeated


def test_generate_pairs_needs_prompts(lm: tuple, tmp_path: Path) -> None:
    model, tokenizer = lm
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_pairs(model, tokenizer, [], CountingAnnotator(), tmp_path / "p.jsonl", 4)


def test_pairs_store_their_example_record(tmp_path: Path) -> None:
    """A pair keeps its prompt's references and meta through the JSONL file, so a gold scorer can judge it again."""
    example = Example("doc", ("a summary", "another"), {"module": "json", "bonus": 2})
    pair = PreferencePair.of(example, "good", "bad")
    assert json.loads(pair.to_json()) == {
        "prompt": "doc", "chosen": "good", "rejected": "bad", "references": ["a summary", "another"],
        "module": "json", "bonus": 2,
    }  # fmt: skip
    append_pairs(tmp_path / "p.jsonl", [pair, PreferencePair("plain", "a", "b", 0.5)])
    loaded = load_preferences(tmp_path / "p.jsonl")
    assert loaded == [pair, PreferencePair("plain", "a", "b", 0.5)] and loaded[0].example == example
    write_lines(tmp_path / "bad.jsonl", [json.dumps({**VALID, "references": "one string"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'references' must be a list of strings"):
        load_preferences(tmp_path / "bad.jsonl")


def test_simulated_annotator_judges_with_the_records_columns() -> None:
    """A reference-based gold scorer gets each record's references (noise-free labels follow them); the pairs keep
    the records."""

    class MatchesReference:
        def score(self, prompts: Sequence[str], completions: Sequence[str], references: list) -> list[float]:
            return [float(c in refs) for c, refs in zip(completions, references, strict=True)]

    examples = [Example("p", ("x",)), Example("q", ("w",), {"bonus": 1})]
    pairs = SimulatedAnnotator(MatchesReference(), beta=float("inf")).label(examples, ["x", "y"], ["z", "w"])
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "z"), ("w", "y")]
    assert [p.example for p in pairs] == examples
