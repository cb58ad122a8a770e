"""``python -m agents.zoo train|enjoy <rl-zoo3 arguments>``: rl-zoo3 with ``maskable_ppo`` added."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "enjoy"):
        raise SystemExit("usage: python -m agents.zoo train|enjoy [rl_zoo3 arguments, e.g. --algo maskable_ppo ...]")
    from text_env.extras import MissingExtra, require

    try:
        require("zoo", "python -m agents.zoo")
    except MissingExtra as err:
        raise SystemExit(str(err)) from None
    from rl_zoo3 import enjoy, train

    from agents.zoo import register

    register()
    command, sys.argv = argv[0], [f"rl_zoo3.{argv[0]}", *argv[1:]]
    (train.train if command == "train" else enjoy.enjoy)()


if __name__ == "__main__":
    main()
