"""First contact: the optional extras are one table, checked at the door of each command that needs one; a failed
start is one line and leaves no run directory; the packages import each other in one direction only."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import tomllib

from agents.cli import main
from text_env.extras import EXTRAS, MissingExtra, is_available, require

ROOT = Path(__file__).resolve().parents[1]


def _base_install_cases() -> list[tuple[list[str], str]]:
    """The (arguments of `textgen`, the extra they need) cases of .ci/base_install_check.py, which runs them without
    the extras: one table for both (the script imports only the standard library at module level)."""
    spec = importlib.util.spec_from_file_location("base_install_check", ROOT / ".ci" / "base_install_check.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.NEEDS_EXTRA


NEEDS_EXTRA = _base_install_cases()


def _without(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    """Make ``extra``'s modules unimportable, as they are in a base install."""
    for module in EXTRAS[extra]:
        monkeypatch.setitem(sys.modules, module, None)


def test_the_table_is_pyprojects_extras() -> None:
    """Every extra a feature needs is one of pyproject's, and every extra of pyproject is in the table (but the
    bundles); what a default run uses (LoRA's peft, the run's plot) is a core dependency."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["optional-dependencies"]) - {"all", "dev"} == set(EXTRAS)
    core = " ".join(project["dependencies"])
    assert "peft" in core and "matplotlib" in core


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch, extra: str) -> None:
    assert is_available(extra)  # the dev install has every extra
    _without(monkeypatch, extra)
    assert not is_available(extra)
    hint = rf"^the feature needs the '{extra}' extra: pip install -e \"\.\[{extra}\]\"$"
    with pytest.raises(MissingExtra, match=hint):
        require(extra, "the feature")
    with pytest.raises(KeyError, match="unknown extra"):
        is_available("nope")


@pytest.mark.parametrize(("argv", "extra"), NEEDS_EXTRA, ids=[" ".join(a[:2]) for a, _ in NEEDS_EXTRA])
def test_a_command_without_its_extra_says_which_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    extra: str,
) -> None:
    """Before any model is loaded (none could be: TEXTGEN_CACHE is empty and stays so) or a directory made."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "runs" / "some-run").mkdir(parents=True)
    _without(monkeypatch, extra)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"textgen {argv[0]}") and lines[0].endswith(f"needs the '{extra}' extra: "
                                                                           f'pip install -e ".[{extra}]"')  # fmt: skip
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["runs", "runs/some-run"]


def test_inspect_writes_html_without_the_label_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """--html writes a file and serves nothing: no extra needed (the run directory's absence is the error)."""
    _without(monkeypatch, "label")
    with pytest.raises(SystemExit) as exit_:
        main(["inspect", "/nonexistent-run", "--html", "out.html"])
    assert exit_.value.code == 1


def test_the_zoo_launcher_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.zoo.__main__ import main as zoo

    _without(monkeypatch, "zoo")
    with pytest.raises(SystemExit, match=r"^python -m agents.zoo needs the 'zoo' extra"):
        zoo(["train"])


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--task", "nope"], "unknown task 'nope'"),
     (["--prompts", "/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
     (["--model", "/nonexistent/dir"], "model directory '/nonexistent/dir' does not exist"),
     (["--reward-model", "/nonexistent/rm"], "/nonexistent/rm")],
)  # fmt: skip
def test_a_failed_start_is_one_line_and_leaves_no_run_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))  # and nothing is fetched
    for command in ("train", "rlhf"):
        with pytest.raises(SystemExit) as exit_:
            main([command, *option, "--out", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
        assert "Traceback" not in err and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def _imports(path: Path) -> set[str]:
    """The modules a file imports (absolute names; ``from . import x`` is resolved against its package)."""
    names: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    ("folder", "never"),
    [("text_env", ("agents", "benchmarks")),  # the environment never imports the learner
     ("agents", ("benchmarks",)),  # the product never imports the benchmarks
     ("text_env/rewards", ("text_env.tasks",))],  # judges are below the tasks that use them
)  # fmt: skip
def test_imports_run_one_way(folder: str, never: tuple[str, ...]) -> None:
    offending = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).rglob("*.py")
        for name in _imports(path)
        if any(name == n or name.startswith(n + ".") for n in never)
    }
    assert not offending, sorted(offending)
