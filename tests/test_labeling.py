"""`textgen label`: the pairs file, the preference JSONL it writes (read back by load_preferences), resuming, the
lock that keeps two tabs from writing a pair twice, agreement statistics, refused requests, the token off
loopback, sampling pairs from a model, and a person labelling with the keyboard in a real headless Chromium across a
killed and restarted server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import TIMEOUT, chromium, serving, wait_for

from agents.labeling import (
    LabelingError,
    LabelStore,
    load_pairs_to_label,
    make_labeling_app,
    pair_id,
    sample_pairs_to_label,
    undecided_path,
)
from agents.web import access_token, is_loopback, page_url
from text_env.rewards.gold import VaderSentiment
from text_env.rewards.preferences import load_preferences

PAIRS = [
    {"prompt": "The film", "a": "was wonderful and moving.", "b": "was dull and awful."},
    {"prompt": "The plot", "a": "is a terrible mess.", "b": "is great fun."},
    {"prompt": "Overall,", "a": "a fine evening.", "b": "a bad evening."},
    {"prompt": "The acting", "a": "was superb.", "b": "was wooden."},
]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def request(url: str, body: bytes | dict | None = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST ``body`` as JSON) ``url``; return the status and the JSON answer, 4xx included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "to-label.jsonl", PAIRS)


@pytest.fixture
def store(pairs_file: Path, tmp_path: Path) -> Any:
    store = LabelStore(load_pairs_to_label(pairs_file), tmp_path / "prefs.jsonl", VaderSentiment())
    yield store
    store.close()


# --- the pairs file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"prompt": "p", "a": "x", "b": "y"}\n{"prompt": "p", "a": "x"\n', r"to-label.jsonl:2: not valid JSON"),
     ('\n\n["p", "x", "y"]\n', r"to-label.jsonl:3: expected a JSON object"),
     ('{"prompt": "p", "text": "x"}\n', r"to-label.jsonl:1: missing the completions"),
     ('{"prompt": "p", "a": "x", "b": 3}\n', r"to-label.jsonl:1: field 'b' must be a string"),
     ('{"prompt": " ", "a": "x", "b": "y"}\n', r"to-label.jsonl:1: the prompt is empty"),
     ('{"prompt": "p", "a": "x", "b": "y", "references": "z"}\n', r"to-label.jsonl:1: 'references' must be a list"),
     ("\n", r"holds no pairs")],
)  # fmt: skip
def test_malformed_pairs_file_names_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "to-label.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_pairs_to_label(path)


def test_a_reference_task_is_judged_against_the_references_its_labels_keep(tmp_path: Path) -> None:
    """The gold of a reference-based task (chrF against a reply) sees each pair's references, and every label line
    carries them and the record's metadata on, so the preferences can be judged again and fit a reward model."""
    from text_env.rewards.gold import ChrF

    record = {"prompt": "Hello, how are you?", "a": "I am fine, thank you.", "b": "Bananas are yellow.",
              "references": ["I am fine, thank you."], "category": "greetings"}  # fmt: skip
    store = LabelStore(
        load_pairs_to_label(write_jsonl(tmp_path / "to-label.jsonl", [record])), tmp_path / "p.jsonl", ChrF()
    )
    try:
        (pair,) = store.pairs
        assert pair.references == ("I am fine, thank you.",) and pair.meta == {"category": "greetings"}
        assert pair.public()["references"] == ["I am fine, thank you."]  # the page shows what the gold compares with
        assert store.gold_scores is not None
        right, wrong = store.gold_scores[0] if pair.a == record["a"] else store.gold_scores[0][::-1]
        assert right == pytest.approx(1.0) and wrong < 0.3  # the reference itself vs an unrelated reply
        store.record(pair.pair_id, "ann", "a" if pair.a == record["a"] else "b")
        assert store.stats("ann")["gold"]["rate"] == 1.0
        (saved,) = load_preferences(tmp_path / "p.jsonl")
        assert saved.chosen == record["a"] and saved.references == ("I am fine, thank you.",)
        assert saved.meta["category"] == "greetings"
    finally:
        store.close()


def test_relabelled_pairs_hide_the_old_label_and_repeats_are_dropped(tmp_path: Path) -> None:
    records = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    pairs = load_pairs_to_label(write_jsonl(tmp_path / "old.jsonl", [*records, records[0]]))
    assert len(pairs) == 40  # the repeated line is one pair
    shown_first = sum(p.a.startswith("good") for p in pairs)
    assert 10 < shown_first < 30  # the chosen completion is A about half the time, not always
    assert load_pairs_to_label(tmp_path / "old.jsonl") == pairs  # the same order on every start
    assert all(p.pair_id == pair_id(p.prompt, p.b, p.a) for p in pairs)  # either order names the same pair


# --- what is written, and resuming ----------------------------------------------------------------------------


def test_labels_are_preference_lines_and_a_restart_resumes(store: LabelStore, pairs_file: Path, tmp_path: Path) -> None:
    ids = [p.pair_id for p in store.pairs]
    for pid, label in zip(ids, ["a", "b", "tie", "skip"], strict=True):
        assert store.next_pair("alice").pair_id == pid  # file order
        store.record(pid, "alice", label)
    assert store.next_pair("alice") is None
    prefs = load_preferences(tmp_path / "prefs.jsonl")  # the file train-rm reads, extra fields and all
    assert [(p.prompt, p.chosen, p.rejected) for p in prefs] == [
        ("The film", "was wonderful and moving.", "was dull and awful."),
        ("The plot", "is great fun.", "is a terrible mess."),
    ]
    written = lines(tmp_path / "prefs.jsonl")
    assert {r["annotator"] for r in written} == {"alice"} and all(
        re.match(r"\d{4}-\d\d-\d\dT", r["time"]) for r in written
    )
    undecided = lines(undecided_path(tmp_path / "prefs.jsonl"))
    assert [(r["pair_id"], r["label"]) for r in undecided] == [(ids[2], "tie"), (ids[3], "skip")]

    store.close()  # a restart reads every label back: alice is done, bob starts at the first pair
    again = LabelStore(load_pairs_to_label(pairs_file), tmp_path / "prefs.jsonl", VaderSentiment())
    try:
        assert again.next_pair("alice") is None and again.next_pair("bob").pair_id == ids[0]
        assert again.stats("alice")["done"] == 4 and again.stats()["labelled"] == 3  # a skip judges nothing
        with pytest.raises(LabelingError, match="already labelled by 'alice'") as refused:
            again.record(ids[2], "alice", "a")
        assert refused.value.status == 409
    finally:
        again.close()


def test_labels_written_by_others_count_and_a_torn_last_line_is_dropped(pairs_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    first = PAIRS[0]
    data.write_text(
        json.dumps({"prompt": first["prompt"], "chosen": first["b"], "rejected": first["a"]}) + "\n"  # no annotator
        + '{"prompt": "The plot", "chos'  # a write cut short
    )  # fmt: skip
    store = LabelStore(load_pairs_to_label(pairs_file), data)
    try:
        assert store.labels[store.pairs[0].pair_id] == {"": "b"}
        assert data.read_text().endswith("}\n") and len(lines(data)) == 1
        store.record(store.pairs[1].pair_id, "alice", "a")
        assert len(load_preferences(data)) == 2
    finally:
        store.close()


def test_malformed_preference_file_is_reported_with_its_line(pairs_file: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: missing field\(s\) chosen, rejected"):
        LabelStore(load_pairs_to_label(pairs_file), data)


def test_two_tabs_never_write_the_same_pair_twice(store: LabelStore, tmp_path: Path) -> None:
    first, second = store.next_pair("alice", tab="tab-1"), store.next_pair("alice", tab="tab-2")
    assert first is not None and second is not None and first.pair_id != second.pair_id  # each tab its own pair
    assert store.next_pair("alice", tab="tab-1") == first  # a reload gets its pair back
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def answer() -> None:
        start.wait()
        try:
            store.record(first.pair_id, "alice", "a")
            outcomes.append("saved")
        except LabelingError as err:
            outcomes.append(str(err.status))

    threads = [threading.Thread(target=answer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["409"] * 7 + ["saved"]
    assert [r["pair_id"] for r in lines(tmp_path / "prefs.jsonl")] == [first.pair_id]


def test_a_second_server_on_the_same_file_is_refused(store: LabelStore, pairs_file: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"another process .* is writing labels to"):
        LabelStore(load_pairs_to_label(pairs_file), tmp_path / "prefs.jsonl")


def test_agreement_between_annotators_and_with_gold(store: LabelStore) -> None:
    film, plot, overall, _ = (p.pair_id for p in store.pairs)
    assert store.stats("alice")["agreement"] is None and store.stats()["gold"] is None
    store.record(film, "alice", "a")  # gold (VADER) prefers a: 'wonderful' over 'awful'
    store.record(film, "bob", "a")
    store.record(plot, "alice", "b")  # gold prefers b
    store.record(plot, "bob", "a")
    store.record(overall, "alice", "tie")
    store.record(overall, "bob", "tie")
    stats = store.stats("bob")
    assert stats["agreement"] == {"pairs": 3, "rate": 2 / 3}
    assert stats["annotators"] == {"alice": 3, "bob": 3} and (stats["labelled"], stats["done"]) == (3, 3)
    gold = stats["gold"]
    assert (gold["labels"], gold["rate"], gold["yours"]) == (4, 0.75, {"labels": 2, "rate": 0.5})
    assert 0.5 < gold["simulated"] <= 1.0 and gold["beta"] == 10.0


# --- the web app -------------------------------------------------------------------------------------------------


def test_bad_requests_get_a_4xx_with_a_message_and_change_nothing(store: LabelStore, tmp_path: Path) -> None:
    with serving(make_labeling_app(store)) as url:
        pid = request(f"{url}/api/next?annotator=alice")[1]["pair"]["pair_id"]
        assert request(f"{url}/api/label", {"pair_id": pid, "annotator": "alice", "label": "a"})[0] == 200
        before, api = (tmp_path / "prefs.jsonl").read_bytes(), f"{url}/api/label"
        refused = [
            (request(api, {"pair_id": "f00", "annotator": "alice", "label": "a"}), 404, "unknown pair id"),
            (request(api, {"pair_id": pid, "annotator": "alice", "label": "b"}), 409, "already labelled"),
            (request(api, b'{"pair_id": '), 422, "malformed request: .*JSON"),
            (request(api, {"pair_id": pid, "annotator": "bob", "label": "c"}), 422, "body.label"),
            (request(api, {"pair_id": pid, "annotator": "bo b", "label": "a"}), 422, "body.annotator"),
            (request(api, {"pair_id": pid, "annotator": "bob", "label": "a", "x": 1}), 422, "body.x"),
            (request(api, [1, 2]), 422, "malformed request"),
            (request(f"{url}/api/next"), 422, "query.annotator"),
        ]  # fmt: skip
        for (status, body), expected, message in refused:
            assert status == expected and re.search(message, body["detail"]), body
        assert (tmp_path / "prefs.jsonl").read_bytes() == before
        assert not undecided_path(tmp_path / "prefs.jsonl").exists()


def test_a_token_guards_every_request_but_the_page_code(store: LabelStore) -> None:
    with serving(make_labeling_app(store, token="s3cret")) as url:
        status, body = request(f"{url}/api/next?annotator=alice")
        assert status == 403 and "secret token" in body["detail"]
        assert request(f"{url}/api/next?annotator=alice&token=wrong")[0] == 403
        assert request(f"{url}/api/next?annotator=alice&token=s3cret")[0] == 200
        with urllib.request.urlopen(f"{url}/static/app.js", timeout=TIMEOUT) as script:  # code only, no data
            assert b"api/label" in script.read()


def test_loopback_needs_no_token_and_any_other_host_gets_one() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert access_token("127.0.0.1") is None and access_token("127.0.0.1", "mine") == "mine"
    first, second = access_token("0.0.0.0"), access_token("0.0.0.0")
    assert first and second and first != second and len(first) >= 20
    with pytest.raises(ValueError, match="must not be empty"):
        access_token("0.0.0.0", " ")
    assert page_url("127.0.0.1", 8765, "tok", annotator="a b") == "http://127.0.0.1:8765/?token=tok&annotator=a+b"


def test_pairs_sampled_from_a_model(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "sampled.jsonl"
    pairs = sample_pairs_to_label(str(tiny_model), out, "positive-review", n_pairs=3, max_new_tokens=4, seed=1)
    assert len(pairs) == 3 and [p.pair_id for p in pairs] == [p.pair_id for p in load_pairs_to_label(out)]
    records = lines(out)
    assert all(r["model"] == str(tiny_model) and r["a"] and r["b"] for r in records)
    from text_env.tasks import get_task

    assert all(r["prompt"] in get_task("positive-review").train_prompts for r in records)


# --- a person at the page, in a real browser ---------------------------------------------------------------------


def start_server(data: Path, pairs: Path) -> tuple[subprocess.Popen[str], str]:
    """``textgen label`` in its own process on a free port; return it and the address it printed."""
    command = [sys.executable, "-m", "agents.cli", "label", "--data", str(data), "--pairs", str(pairs), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed: list[str] = []

    def address() -> str | None:
        line = process.stdout.readline()  # type: ignore[union-attr]
        printed.append(line)
        if process.poll() is not None and not line:
            raise AssertionError(f"textgen label exited: {''.join(printed)}")
        found = re.search(r"open (http://\S+)", line)
        return found.group(1) if found else None

    try:
        return process, wait_for(address, "textgen label to print its address", timeout=120)
    except BaseException:
        process.kill()
        process.wait()
        raise


def shown_pair(driver: Any, previous: str | None = None) -> str:
    """The pair the page shows once it is ready (a different one than ``previous``)."""

    def ready() -> str | None:
        body = driver.find_element("tag name", "body")
        pid = body.get_attribute("data-pair-id")
        return pid if body.get_attribute("data-state") == "ready" and pid and pid != previous else None

    return wait_for(ready, "the next pair to show")


@pytest.mark.browser
def test_keyboard_labels_survive_a_killed_server(pairs_file: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    data = tmp_path / "prefs.jsonl"
    ids = [p.pair_id for p in load_pairs_to_label(pairs_file)]
    process, url = start_server(data, pairs_file)
    try:
        with chromium(tmp_path / "profile") as driver:
            driver.get(url + "?annotator=alice")
            shown = shown_pair(driver)
            assert shown == ids[0] and driver.find_element("id", "text-a").text == PAIRS[0]["a"]
            assert not driver.find_element("id", "reference").is_displayed()  # these pairs have no references
            for key in ("a", "b", "t"):  # A better, B better, tie
                ActionChains(driver).send_keys(key).perform()
                shown = shown_pair(driver, shown)
            assert shown == ids[3]
            progress = driver.find_element("id", "progress-text").text
            assert progress.startswith("you: 3 / 4 pairs"), progress

            process.send_signal(signal.SIGKILL)  # no shutdown: only what was on disk survives
            process.wait(TIMEOUT)
            written = lines(data)
            assert [(r["pair_id"], r["label"], r["annotator"]) for r in written] == [
                (ids[0], "a", "alice"), (ids[1], "b", "alice")
            ]  # fmt: skip
            assert written[0]["chosen"] == PAIRS[0]["a"] and written[1]["chosen"] == PAIRS[1]["b"]
            assert [(r["pair_id"], r["label"]) for r in lines(undecided_path(data))] == [(ids[2], "tie")]

            process, url = start_server(data, pairs_file)  # restart: resumes at the first pair alice has not labelled
            driver.get(url + "?annotator=alice")
            assert shown_pair(driver) == ids[3]
            ActionChains(driver).send_keys("s").perform()
            wait_for(lambda: driver.find_element("tag name", "body").get_attribute("data-state") == "done", "done")
            assert driver.find_element("id", "done").is_displayed()

            driver.get(url + "?annotator=bob")  # a second person: agreement with alice shows up
            assert shown_pair(driver) == ids[0]
            ActionChains(driver).send_keys("1").perform()
            shown_pair(driver, ids[0])
            agreement = driver.find_element("id", "agreement").text
            assert agreement.startswith("100 % of answers agree, on 1 pair"), agreement
            assert "simulated annotator" in driver.find_element("id", "gold").text

        status, body = request(url.split("?")[0] + "api/label", {"pair_id": "nope", "annotator": "bob", "label": "a"})
        assert status == 404 and "unknown pair id 'nope'" in body["detail"]
        pids = [(r["pair_id"], r["annotator"]) for r in lines(data) + lines(undecided_path(data))]
        assert len(pids) == len(set(pids)) == 5  # alice's four, bob's one: nothing lost, nothing twice
        assert len(load_preferences(data)) == 3
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.browser
def test_the_page_shows_a_pairs_references(tmp_path: Path) -> None:
    """A reference-based task's pair (a dialogue turn and the corpus reply) shows its references under the prompt."""
    record = {"prompt": "Hello, how are you?", "a": "I am fine.", "b": "Bananas.", "references": ["Fine, thanks."]}
    process, url = start_server(tmp_path / "prefs.jsonl", write_jsonl(tmp_path / "to-label.jsonl", [record]))
    try:
        with chromium(tmp_path / "profile") as driver:
            driver.get(url + "?annotator=alice")
            shown_pair(driver)
            box = driver.find_element("id", "reference")
            assert box.is_displayed() and "automatic judge" in box.text
            box.click()  # <details>: the references show when opened
            wait_for(lambda: driver.find_element("css selector", "#references li").text == "Fine, thanks.", "ref")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)


def test_cli_needs_pairs_or_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agents.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["label", "--data", str(tmp_path / "prefs.jsonl")])
    assert exit_.value.code == 1 and "give the pairs to label (--pairs FILE)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "a": "x", "b": "y"}\nnot json\n')
    with pytest.raises(SystemExit):
        main(["label", "--data", str(tmp_path / "prefs.jsonl"), "--pairs", str(bad)])
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
