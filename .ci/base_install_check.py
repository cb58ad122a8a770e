"""What a new user's base install must do: the README's first command, without extras (.ci/run runs this first).

Run in a fresh virtual environment holding exactly ``pip install torch==2.13.0 && pip install -e .``. It checks that
1. no optional extra is installed (so this really is the user's path, not the developers');
2. ``textgen --help`` and every subcommand's ``--help`` answer;
3. each command or option that needs an extra says so in one line that names the extra (exit 1), before any download,
   model load or run directory;
4. ``textgen train`` in its default configuration (LoRA, KL penalty, the run's plot) runs end to end on a tiny model
   built here (the default model would take minutes), writes report.md, report.json, model.zip and training.png, and
   prints no warning.

Usage: python .ci/base_install_check.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# (arguments of `textgen`, the extra its one-line hint must name): one case per command or option that needs one;
# tests/test_extras.py checks the same table in-process
NEEDS_EXTRA: list[tuple[list[str], str]] = [
    (["label", "--data", "labels.jsonl", "--pairs", "pairs.jsonl"], "label"),
    (["inspect", "runs/some-run"], "label"),
    (["train", "--engine", "rllib"], "rllib"),
    (["train", "--tensorboard"], "tensorboard"),
    (["train", "--prompts", "hf:imdb"], "datasets"),
    (["rlhf", "--prompts", "hf:imdb"], "datasets"),
    (["train-rm", "--data", "hf:some/pairs", "--out", "rm"], "datasets"),
    (["export", "runs", "exported"], "rllib"),  # a directory: an RLlib run
]
WARNING = re.compile(r"\w*Warning\b|\bWARNING\b")


def fail(message: str) -> None:
    print(f"base install check FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def in_process(main: Callable[[list[str]], object], argv: list[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``main(argv)`` run here (a subprocess per command would cost more time in
    imports than the commands themselves)."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as stop:
            code = stop.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits 1
        err.write(code + "\n")
        code = 1
    return int(code or 0), out.getvalue(), err.getvalue()


def main() -> None:
    from text_env.extras import EXTRAS, is_available

    installed = [extra for extra in EXTRAS if is_available(extra)]
    if installed:
        fail(f"extras {installed} are installed: run this in a venv with the base install only")
    from agents.cli import build_parser
    from agents.cli import main as textgen
    from agents.zoo.__main__ import main as zoo
    from text_env.models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "TEXTGEN_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        os.environ.update(env)
        os.chdir(work)
        (work / "runs" / "some-run").mkdir(parents=True)  # inspect's and export's argument exists
        result = run(["textgen", "--help"], work, env)  # the console script itself
        if result.returncode != 0 or "usage: textgen" not in result.stdout:
            fail(f"textgen --help exited {result.returncode}: {result.stderr[-500:]}")
        commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        for name in commands:
            code, out, err = in_process(textgen, [name, "--help"])
            if code != 0 or f"usage: textgen {name}" not in out:
                fail(f"textgen {name} --help exited {code}: {err[-500:]}")
        print(f"--help: textgen and its {len(commands)} subcommands ({', '.join(commands)}) answer")

        cases = [(textgen, ["textgen", *argv], extra) for argv, extra in NEEDS_EXTRA]
        cases.append((zoo, ["python -m agents.zoo", "train"], "zoo"))
        for command, argv, extra in cases:
            before = sorted(work.rglob("*"))
            code, _, err = in_process(command, argv[1:])
            lines = err.strip().splitlines()
            hint = f'needs the {extra!r} extra: pip install -e ".[{extra}]"'
            if code != 1 or len(lines) != 1 or hint not in lines[0]:
                fail(f"{' '.join(argv)}: expected exit 1 and one line with {hint!r}, got exit {code}: {err[-800:]!r}")
            if sorted(work.rglob("*")) != before:
                fail(f"{' '.join(argv)} left files behind (a run directory, a download?)")
            print(f"{' '.join(argv)}: {lines[0]}")

        tiny = make_tiny_model(work / "tiny-lm")
        argv = ["textgen", "train", "--model", str(tiny), "--reward-model", "gold", "--total-timesteps", "64",
                "--n-envs", "4", "--n-steps", "8", "--max-new-tokens", "8", "--batch-size", "16",
                "--eval-prompts", "4", "--max-prompt-tokens", "128", "--out", str(work / "out")]  # fmt: skip
        result = run(argv, work, env)
        if result.returncode != 0:
            fail(f"the default textgen train on a tiny model exited {result.returncode}: {result.stderr[-3000:]}")
        warnings = [line for line in (result.stdout + result.stderr).splitlines() if WARNING.search(line)]
        if warnings:
            fail("the default textgen train printed warnings:\n" + "\n".join(warnings))
        (run_dir,) = (work / "out").iterdir()
        missing = [f for f in ("report.md", "report.json", "model.zip", "training.png") if not (run_dir / f).is_file()]
        if missing:
            fail(f"the run {run_dir} has no {', '.join(missing)}")
        config = json.loads((run_dir / "config.json").read_text())
        if config["lora_r"] != 16 or config["beta"] <= 0 or config["algo"] != "ppo":
            fail(f"not the default configuration (LoRA r=16, KL penalty, PPO): {config}")
        print(f"textgen train (defaults, LoRA + KL penalty, on a tiny model): {', '.join(sorted(os.listdir(run_dir)))}")
    print("base install check passed")


if __name__ == "__main__":
    main()
