"""``textgen label``: people label preference pairs on a local web page, written as the project's preference JSONL.

The pairs to label come from a JSONL file, one object a line: ``{"prompt", "a", "b"}`` (two completions), or
``{"prompt", "chosen", "rejected"}`` to relabel pairs that were labelled before (a ``textgen rlhf`` round's
``pairs.jsonl``, simulated labels), shown in a fixed random order so that the old label does not show through the
position. A line may also carry the prompt record's ``references`` (a list of strings) and other fields (its
metadata, e.g. ``category`` or unit tests): a reference-based gold scorer judges the pair against them, and each
label line keeps them. :func:`sample_pairs_to_label` writes such a file from a model's or a trained run's samples,
with the task's records.

What is written, one line per label, appended, flushed and ``fsync``-ed before the page is answered:

- ``--data`` (e.g. ``prefs.jsonl``) gets the decisive labels (A or B) as the preference lines the rest of the
  project reads (:func:`~text_env.rewards.preferences.load_preferences`, ``textgen train-rm``): ``prompt``,
  ``chosen``, ``rejected``, plus ``annotator``, ``time`` (UTC, ISO 8601), ``pair_id`` and ``label`` (``"a"`` or
  ``"b"``, the side the person saw), which those readers ignore.
- ``<data stem>.undecided.jsonl`` beside it gets ties and skips (``pair_id``, ``prompt``, ``a``, ``b``,
  ``annotator``, ``time``, ``label``: ``"tie"`` or ``"skip"``). A tie says neither completion is better, which a
  Bradley–Terry pair cannot hold; a skip says the person did not judge. Neither belongs among training pairs, but
  both are done: a restart does not ask that person again.

Each annotator id labels each pair at most once; a restart resumes at the first pair the annotator has not labelled.
One lock orders every write, so two browser tabs never write the same pair twice: a pair handed to one tab is held
for it for ``lease_seconds``, and a second answer for a labelled pair is refused with 409.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the request-body type of the endpoint made inside
# make_labeling_app from its annotation, which must be the class itself rather than a name it cannot look up.
import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from text_env.prompts import RESERVED_COLUMNS, Example, check_prompt, columns_of, read_jsonl
from text_env.rewards import Scorer, call_scorer
from text_env.rewards.annotators import SimulatedAnnotator
from text_env.rewards.preferences import drop_torn_last_line, load_preferences, prompt_order, sample_completions
from text_env.tasks import Task, get_task

__all__ = [
    "LABELS",
    "LabelPair",
    "LabelStore",
    "LabelingError",
    "load_pairs_to_label",
    "make_labeling_app",
    "pair_id",
    "sample_pairs_to_label",
    "undecided_path",
]

LABELS = ("a", "b", "tie", "skip")
ANNOTATOR_PATTERN = r"^[\w.@+-]{1,64}$"  # an id, not free text: letters, digits and . @ + - _
PAGE = Path(__file__).parent / "labeling_page"
_PAIR_FIELDS = frozenset({"a", "b", "model", "annotator", "time", "pair_id", "label"})
"""A pair or label line's own fields; any other field but the reserved ones is the prompt record's metadata."""


class LabelingError(Exception):
    """A request the store refuses; ``status`` is the HTTP status the page gets with the message."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LabelPair:
    """Two completions of a prompt, shown as A and B. ``where`` is the ``file:line`` it was read from.

    ``references`` and ``meta`` are the prompt's example record's (a summary, a reply, unit tests): the gold scorer
    judges the pair against them, and every label line keeps them, as :class:`PreferencePair` does.
    """

    pair_id: str
    prompt: str
    a: str
    b: str
    where: str = ""
    references: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def example(self) -> Example:
        """The prompt's record, whose columns a reference-based gold scorer takes."""
        return Example(self.prompt, self.references, self.meta)

    def columns(self) -> dict[str, Any]:
        """What a label line carries besides the prompt and the completions: references and metadata."""
        return self.example.columns()

    def public(self) -> dict[str, Any]:
        """What the page shows: the pair, and the prompt's references (a summary, a reply) when it has any, so that
        a person judges against what the task's gold scorer compares with."""
        return {"pair_id": self.pair_id, "prompt": self.prompt, "a": self.a, "b": self.b,
                "references": list(self.references)}  # fmt: skip


def pair_id(prompt: str, x: str, y: str) -> str:
    """A pair's id: a hash of the prompt and its two completions in either order, so a labelled line
    (``chosen``/``rejected``) finds the pair it labels whichever side was chosen."""
    key = json.dumps([prompt, *sorted((x, y))], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def undecided_path(data: str | os.PathLike[str]) -> Path:
    """Where ties and skips of the labels in ``data`` go: ``<stem>.undecided.jsonl`` beside it."""
    data = Path(data)
    return data.with_name(f"{data.stem}.undecided.jsonl")


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if not isinstance(record.get(key), str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(record.get(key)).__name__}")
    return record[key]


def load_pairs_to_label(path: str | os.PathLike[str]) -> list[LabelPair]:
    """Read the pairs to label (see the module docstring); a pair that repeats an earlier one is dropped.

    :raises ValueError: a malformed line, naming the file and line; a file with no pairs.
    """
    path = Path(path)
    pairs: dict[str, LabelPair] = {}
    for where, record in read_jsonl(path, "pairs file"):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt and a/b (or chosen/rejected)")
        if "a" in record or "b" in record:
            keys = ("a", "b")
        elif "chosen" in record or "rejected" in record:
            keys = ("chosen", "rejected")
        else:
            raise ValueError(f"{where}: missing the completions: give fields a and b (or chosen and rejected)")
        prompt = check_prompt(_text(record, "prompt", where), where)
        x, y = (_text(record, k, where) for k in keys)
        references = record.get("references", [])
        if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
            raise ValueError(f"{where}: 'references' must be a list of strings, got {references!r:.80}")
        meta = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS | _PAIR_FIELDS}
        pid = pair_id(prompt, x, y)
        if keys == ("chosen", "rejected") and int(pid, 16) % 2:  # a fixed coin flip hides the earlier label
            x, y = y, x
        pairs.setdefault(pid, LabelPair(pid, prompt, x, y, where, tuple(references), meta))
    if not pairs:
        raise ValueError(f"pairs file {path} holds no pairs")
    return list(pairs.values())


def _model_and_tokenizer(model: str) -> tuple[Any, Any]:
    """A run directory's trained policy LM, or a model name's LM, with its tokenizer."""
    from agents.inspection import is_saved_run, load_run

    if is_saved_run(model):
        return load_run(model).policy.language_model()
    from text_env.models import load_causal_lm, load_tokenizer

    return load_causal_lm(model), load_tokenizer(model)


def sample_pairs_to_label(
    model: str,
    out: str | os.PathLike[str],
    task: str | Task = "positive-review",
    n_pairs: int = 32,
    split: str = "train",
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> list[LabelPair]:
    """Sample two completions for each of ``n_pairs`` prompts of ``task`` and write them to ``out`` as pairs to label.

    :param model: ``"default"``, a model directory or hub id, or a run directory (its trained policy's LM).
    :param split: the task's prompts to draw from (``"train"``: the pairs are for fitting a reward model).
    :param max_new_tokens: completion length (default: the task's).
    """
    task = get_task(task)
    examples = task.examples(split)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    chosen = [examples[i] for i in prompt_order(len(examples), n_pairs, seed)]
    lm, tokenizer = _model_and_tokenizer(model)
    import torch

    torch.manual_seed(seed)
    length = max_new_tokens or task.max_new_tokens
    samples = sample_completions(lm, tokenizer, [e.prompt for e in chosen], task.instruction, length, 2, batch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"prompt": e.prompt, "a": a, "b": b, **e.columns(), "model": model}, ensure_ascii=False)
        for e, (a, b) in zip(chosen, samples, strict=True)
    ]
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)  # a pairs file is whole or absent: labels refer to its pairs
    return load_pairs_to_label(out)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _append_durably(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write, then flush it to disk: a killed server has the line or not a byte."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold_exclusively(path: Path) -> Any:
    """``path`` opened and locked (``flock``) until closed or the process ends, even by SIGKILL."""
    handle = path.open("ab")
    try:
        import fcntl
    except ImportError:  # Windows has no flock: one server per file is then the user's care
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise OSError(
            f"another process (a textgen label server?) is writing labels to {path}: stop it, or give another --data"
        ) from None
    return handle


class LabelStore:
    """The pairs to label and every label so far, read back from the files at start; one lock orders all writes.

    :param pairs: the pairs, in the order they are asked.
    :param data: the preference JSONL that decisive labels are appended to (made if missing).
    :param gold: the task's gold scorer, to show how often people agree with it (``None``: not shown).
    :param simulated_beta: the sharpness of the simulated annotator shown beside people (as ``textgen preferences``).
    :param lease_seconds: how long a pair handed to a browser tab is kept from the annotator's other tabs.
    """

    def __init__(
        self,
        pairs: Sequence[LabelPair],
        data: str | os.PathLike[str],
        gold: Scorer | None = None,
        simulated_beta: float = 10.0,
        lease_seconds: float = 120.0,
    ) -> None:
        if not pairs:
            raise ValueError("there are no pairs to label")
        self.pairs = list(pairs)
        self.by_id = {p.pair_id: p for p in self.pairs}
        self.data, self.undecided = Path(data), undecided_path(data)
        self.lease_seconds = lease_seconds
        self.labels: dict[str, dict[str, str]] = {p.pair_id: {} for p in self.pairs}  # pair -> annotator -> label
        self._leases: dict[tuple[str, str], tuple[str, float]] = {}  # (pair, annotator) -> (tab, expiry)
        self._lock = threading.Lock()
        self.data.parent.mkdir(parents=True, exist_ok=True)
        self._holder = _hold_exclusively(self.data)  # one server per file: the labels it knows live in memory
        for path in (self.data, self.undecided):
            if (line := drop_torn_last_line(path)) is not None:
                print(
                    f"labeling: dropped the unfinished last line of {path} (line {line}): no label was complete there"
                )
        self._read_labels()
        self.gold_scores: np.ndarray | None = None  # (N, 2) gold of a and b
        self.simulated = SimulatedAnnotator(gold, simulated_beta) if gold is not None else None
        if gold is not None:
            prompts, columns = [p.prompt for p in self.pairs], columns_of([p.example for p in self.pairs])
            score_a = call_scorer(gold, prompts, [p.a for p in self.pairs], columns, "gold scorer")
            score_b = call_scorer(gold, prompts, [p.b for p in self.pairs], columns, "gold scorer")
            self.gold_scores = np.stack([score_a, score_b], axis=1)

    def close(self) -> None:
        """Let another store (a restarted server) write to the files."""
        self._holder.close()

    def _read_labels(self) -> None:
        """Labels already on disk: preference lines of these pairs (any writer's) and this app's ties and skips."""
        if self.data.is_file() and self.data.stat().st_size:
            load_preferences(self.data)  # a malformed preference line stops here, with its line number
            for _, record in read_jsonl(self.data, "preference file"):
                pid = pair_id(record["prompt"], record["chosen"], record["rejected"])
                if pid in self.labels:
                    label = "a" if record["chosen"] == self.by_id[pid].a else "b"
                    self.labels[pid].setdefault(str(record.get("annotator", "")), label)
        if self.undecided.is_file():
            for where, record in read_jsonl(self.undecided, "ties-and-skips file"):
                if not isinstance(record, dict) or record.get("label") not in ("tie", "skip"):
                    raise ValueError(f"{where}: expected an object with label 'tie' or 'skip'")
                if record.get("pair_id") in self.labels:
                    self.labels[record["pair_id"]].setdefault(str(record.get("annotator", "")), record["label"])

    # --- what the page asks -------------------------------------------------------------------------------------
    def next_pair(self, annotator: str, tab: str = "") -> LabelPair | None:
        """The first pair ``annotator`` has not labelled and no other tab of theirs holds; held for ``tab``."""
        with self._lock:
            now = time.monotonic()
            for pair in self.pairs:
                if annotator in self.labels[pair.pair_id]:
                    continue
                holder = self._leases.get((pair.pair_id, annotator))
                if holder is None or holder[0] == tab or holder[1] < now:
                    self._leases[(pair.pair_id, annotator)] = (tab, now + self.lease_seconds)
                    return pair
            return None

    def record(self, pair_id: str, annotator: str, label: Literal["a", "b", "tie", "skip"]) -> dict[str, Any]:
        """Write ``annotator``'s ``label`` of a pair (durably, before returning); return the line written.

        :raises LabelingError: 404 for an unknown pair, 409 when the annotator already labelled it, 422 for a label
            outside :data:`LABELS`.
        """
        if label not in LABELS:
            raise LabelingError(f"label must be one of {', '.join(LABELS)}, got {label!r}", 422)
        pair = self.by_id.get(pair_id)
        if pair is None:
            raise LabelingError(f"unknown pair id {pair_id!r}: it is not in the pairs being labelled", 404)
        with self._lock:
            done = self.labels[pair_id].get(annotator)
            if done is not None:
                raise LabelingError(f"pair {pair_id} was already labelled by {annotator!r} ({done!r})", 409)
            meta = {"annotator": annotator, "time": _now(), "pair_id": pair_id, "label": label}
            if label in ("a", "b"):
                chosen, rejected = (pair.a, pair.b) if label == "a" else (pair.b, pair.a)
                line = {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, **pair.columns(), **meta}
                _append_durably(self.data, line)
            else:
                line = {"prompt": pair.prompt, "a": pair.a, "b": pair.b, **pair.columns(), **meta}
                _append_durably(self.undecided, line)
            self.labels[pair_id][annotator] = label
            self._leases.pop((pair_id, annotator), None)
        return line

    def stats(self, annotator: str | None = None) -> dict[str, Any]:
        """Progress, inter-annotator agreement and agreement with the gold scorer (``None`` where nothing counts).

        ``agreement``: over pairs that two or more annotators judged (A, B or tie), the fraction of annotator pairs
        that gave the same answer. ``gold``: over A/B labels of pairs whose gold scores differ, the fraction that
        chose the higher-gold completion; ``simulated`` is what the simulated annotator's Bradley–Terry model
        expects on the same labels.
        """
        with self._lock:
            labels = {pid: dict(by) for pid, by in self.labels.items()}
        judged = {pid: {a: v for a, v in by.items() if v != "skip"} for pid, by in labels.items()}
        counts: dict[str, int] = {}
        for by in labels.values():
            for who in by:
                counts[who] = counts.get(who, 0) + 1
        same = pairs_of_annotators = shared = 0
        for by in judged.values():
            votes = list(by.values())
            if len(votes) >= 2:
                shared += 1
                for i in range(len(votes)):
                    for j in range(i + 1, len(votes)):
                        same += votes[i] == votes[j]
                        pairs_of_annotators += 1
        return {
            "total": len(self.pairs),
            "labelled": sum(bool(by) for by in judged.values()),
            "done": sum(annotator in by for by in labels.values()) if annotator is not None else None,
            "annotators": dict(sorted(counts.items())),
            "agreement": {"pairs": shared, "rate": same / pairs_of_annotators} if pairs_of_annotators else None,
            "gold": self._gold_agreement(judged, annotator),
        }

    def _gold_agreement(self, judged: dict[str, dict[str, str]], annotator: str | None) -> dict[str, Any] | None:
        if self.gold_scores is None or self.simulated is None:
            return None
        agree, expected, yours = [], [], []
        for i, pair in enumerate(self.pairs):
            gold_a, gold_b = self.gold_scores[i]
            if gold_a == gold_b:
                continue
            for who, label in judged[pair.pair_id].items():
                if label in ("a", "b"):
                    hit = (label == "a") == (gold_a > gold_b)
                    agree.append(hit)
                    hi, lo = max(gold_a, gold_b), min(gold_a, gold_b)
                    expected.append(float(self.simulated.prefer_first_probability(np.array(hi), np.array(lo))))
                    if who == annotator:
                        yours.append(hit)
        if not agree:
            return None
        return {
            "labels": len(agree),
            "rate": float(np.mean(agree)),
            "simulated": float(np.mean(expected)),
            "beta": self.simulated.beta,
            "yours": {"labels": len(yours), "rate": float(np.mean(yours))} if yours else None,
        }


def make_labeling_app(store: LabelStore, token: str | None = None, annotator: str = "") -> Any:
    """The FastAPI app of the labeling page.

    ``GET /`` the page; ``GET /api/next?annotator=&tab=`` the next pair and the stats; ``POST /api/label`` with
    ``{"pair_id", "annotator", "label"}``; ``GET /api/stats?annotator=``. A refused request gets a 4xx status and
    ``{"detail": message}``.

    :param token: the secret every request must carry (see :func:`agents.web.require_token`).
    :param annotator: the annotator id the page starts with when its URL names none.
    """
    from agents.web import check_web_stack

    check_web_stack()
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field

    from agents.web import require_token

    class Label(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pair_id: str = Field(min_length=1, max_length=64)
        annotator: str = Field(pattern=ANNOTATOR_PATTERN)
        label: Literal["a", "b", "tie", "skip"]

    app = FastAPI(title="TextGen labeling", docs_url=None, redoc_url=None, openapi_url=None)
    require_token(app, token)
    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    page = (PAGE / "index.html").read_text(encoding="utf-8").replace("{{ANNOTATOR}}", json.dumps(annotator))

    @app.exception_handler(LabelingError)
    async def refused(request: Request, error: LabelingError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"detail": f"malformed request: {problems}"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/next")
    def next_pair(
        annotator: str = Query(pattern=ANNOTATOR_PATTERN), tab: str = Query("", max_length=64)
    ) -> dict[str, Any]:
        pair = store.next_pair(annotator, tab)
        return {"pair": pair.public() if pair else None, "stats": store.stats(annotator)}

    @app.post("/api/label")
    def label(body: Label) -> dict[str, Any]:
        line = store.record(body.pair_id, body.annotator, body.label)
        return {"saved": line, "stats": store.stats(body.annotator)}

    @app.get("/api/stats")
    def stats(annotator: str | None = Query(None, max_length=64)) -> dict[str, Any]:
        return store.stats(annotator)

    return app
