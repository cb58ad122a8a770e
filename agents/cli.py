"""``textgen``: the RLHF loop from the command line (sample preferences, train a reward model, train, export)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

# Errors that mean the input was wrong, not the program: shown as one line (with text_env.models.ModelLoadError, a
# model that could not be found or loaded; MissingExtra is an ImportError).
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError, KeyError)
_INSPECT_PORT = 8766  # textgen inspect's page, beside textgen label's 8765


def _add_fields(p: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), defaults: Any = None) -> None:
    """One ``--option`` per field of the dataclass ``cls`` (its help text, allowed values and default come from the
    field, or from ``defaults``, an instance), unless skipped; an unset option is ``None`` (:func:`_given` leaves it
    out)."""
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "algo_kwargs":
            continue
        flag, default = f.metadata.get("flag", "--" + f.name.replace("_", "-")), getattr(defaults, f.name)
        helptext = f.metadata["help"] + ("" if default in (None, []) else f" (default: {default})")
        if f.type == "list[str]":  # repeatable: --constraint A --constraint B
            p.add_argument(flag, dest=f.name, action="append", metavar=f.name.upper().rstrip("S"), help=helptext)
        elif f.type == "bool":  # --bf16 / --no-bf16 both exist: a default may depend on the machine (bf16)
            on_off = "on" if default else "off"
            helptext = f.metadata["help"] + f" (default here: {on_off})"
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type).removesuffix(" | None")]
            p.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=helptext)


def _given(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, object]:
    """The options of ``cls``'s fields that the command line set."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name != "algo_kwargs"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _refuse_settings_with_resume(args: argparse.Namespace, given: dict[str, object], extend: str) -> None:
    """``--resume`` takes every setting from the run, but ``extend`` (the budget it may be extended to, if any)."""
    others = [k for k in given if k != extend]
    if others:
        but = f" but --{extend.replace('_', '-')}, which extends the run" if extend else ""
        raise ValueError(
            f"--resume takes every setting from {args.resume}/config.json{but}; drop "
            + ", ".join("--" + k.replace("_", "-") for k in others)
        )


def _needed_extras(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(extra, feature)`` for each optional extra (:data:`text_env.extras.EXTRAS`) that the command and its options
    need, so that a missing one is said before any download, model load or run directory."""
    command, needed = f"textgen {args.command}", []
    if args.command == "label":
        needed.append(("label", command))
    if args.command == "evaluate" and args.human:
        needed.append(("label", f"{command} --human"))
    if args.command == "inspect" and (args.html is None or args.port is not None):
        needed.append(("label", f"{command} (serving the page; --html FILE writes it without the extra)"))
    if getattr(args, "engine", None) == "rllib":
        needed.append(("rllib", f"{command} --engine rllib"))
    if getattr(args, "tensorboard", None):
        needed.append(("tensorboard", f"{command} --tensorboard"))
    for option in ("prompts", "data"):
        value = getattr(args, option, None)
        if isinstance(value, str) and value.startswith("hf:"):
            needed.append(("datasets", f"{command} --{option} {value}"))
    if args.command == "export" and Path(args.model_zip).is_dir():
        needed.append(("rllib", f"{command} of an RLlib run"))
    return needed


def _add_train(sub: argparse._SubParsersAction) -> None:
    """``textgen train``'s options are TrainConfig's fields (one source for every default and help text)."""
    from agents.run import PRESETS, TrainConfig

    p = sub.add_parser(
        "train",
        help="RLHF-train an LM policy with an SB3 algorithm, then compare it with the base model",
        description="Train the LM on a task with reward-model score - beta * KL(policy || base model), evaluate "
        "held-out prompts before and after, print a table and save the run (model.zip, report.md/json, plot). "
        "Ctrl-C saves a checkpoint; --resume RUN_DIR continues it. Defaults are --algo ppo's; other algorithms "
        f"start from their presets ({'; '.join(f'{a}: {v}' for a, v in PRESETS.items())}).",
    )
    _add_fields(p, TrainConfig)
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted run (its settings come from there); with --total-timesteps N above the run's "
        "total, train it on to N, finished or not",
    )  # fmt: skip
    p.add_argument(
        "--engine", choices=["sb3", "rllib"], default="sb3",
        help="sb3: Stable-Baselines3 in this process; rllib: Ray RLlib's PPO on $RAY_ADDRESS's cluster or a local "
        "Ray (the rllib extra: pip install -e '.[rllib]')",
    )  # fmt: skip
    p.add_argument("--num-env-runners", type=int, default=2, help="--engine rllib: sampling processes (0: this one)")
    p.add_argument("--num-learners", type=int, default=0, help="--engine rllib: training processes (0: this one)")
    p.add_argument(
        "--num-gpus-per-learner", type=float, default=0,
        help="--engine rllib: GPUs per Learner (fractions share one; refused where there is none)",
    )  # fmt: skip


def _train(args: argparse.Namespace) -> None:
    from agents.run import TrainConfig
    from agents.train import train

    given = _given(args, TrainConfig)
    if args.engine == "rllib":
        from agents.rllib import train_rllib  # main() checked the rllib extra first

        if args.resume:  # the run's settings, EnvRunners and Learners come from its config.json
            _refuse_settings_with_resume(args, given, "")
            train_rllib(resume=args.resume)
            return
        config = TrainConfig.for_algo(given.pop("algo", "ppo"), **given)
        train_rllib(
            config, num_env_runners=args.num_env_runners, num_learners=args.num_learners,
            num_gpus_per_learner=args.num_gpus_per_learner,
        )  # fmt: skip
        return
    if args.resume:
        _refuse_settings_with_resume(args, given, "total_timesteps")
        train(resume=args.resume, total_timesteps=args.total_timesteps)
        return
    train(TrainConfig.for_algo(given.pop("algo", "ppo"), **given))


def _add_rlhf(sub: argparse._SubParsersAction) -> None:
    """``textgen rlhf``'s options: TrainConfig's fields for PPO (but total_timesteps), then RLHFConfig's."""
    from agents.rlhf import RLHFConfig
    from agents.run import TrainConfig

    p = sub.add_parser(
        "rlhf",
        help="the iterated RLHF loop: PPO, fresh pairs from the policy, a reward-model refit, and again",
        description="Round 0 is the task's reward model. Each round continues PPO from the current policy (KL to the "
        "base model), samples pairs from it on training prompts, has them labelled (simulated or --annotator human) "
        "and refits the reward model on every pair so far. Every round is saved before the next step; Ctrl-C or "
        "SIGTERM stops with what is saved, --resume RUN_DIR continues it. Prints and saves a table per round "
        "(held-out gold, reward-model score, KL, the previous reward model's accuracy on the fresh pairs) and a plot.",
    )
    _add_fields(p, TrainConfig, skip=("total_timesteps",), defaults=RLHFConfig().train)  # the loop's own β
    _add_fields(p, RLHFConfig, skip=("train",))
    p.add_argument(
        "--resume", metavar="RUN_DIR",
        help="continue an interrupted loop (its settings come from there); with --rounds N above the loop's rounds, "
        "run it on to N rounds, finished or not",
    )  # fmt: skip


def _rlhf(args: argparse.Namespace) -> None:
    from agents.rlhf import LOOP_BETA, RLHFConfig, rlhf
    from agents.run import TrainConfig

    given, loop = _given(args, TrainConfig, ("total_timesteps",)), _given(args, RLHFConfig, ("train",))
    if args.resume:
        _refuse_settings_with_resume(args, {**given, **loop}, "rounds")
        rlhf(resume=args.resume, rounds=args.rounds)
        return
    given.setdefault("beta", LOOP_BETA)
    rlhf(RLHFConfig(TrainConfig.for_algo(str(given.pop("algo", "ppo")), **given), **loop))  # type: ignore[arg-type]


def _tasks(args: argparse.Namespace) -> None:
    """A markdown table of every registered task (building each reads its data: a few seconds); with ``--measure
    N``, the base model's gold on each task's first N eval prompts too, each row printed as it is measured."""
    from text_env.rewards import scorer_name
    from text_env.tasks import get_task, list_tasks

    measure = f" base model's gold ({args.measure} eval prompts) |" if args.measure else ""
    print(f"| task | what and where from | train / eval records | gold | reward model | new tokens | recommended path |"
          f"{measure}")  # fmt: skip
    print("|---|---|---|---|---|---|---|" + ("---|" if measure else ""))
    for name in list_tasks():
        task = get_task(name)
        learned = "learned, shipped" if task.reward_model else "the gold (none learned yet)"
        row = (
            f"| {name} | {task.description.removeprefix(name + ': ')} | {len(task.train_prompts)} / "
            f"{len(task.eval_prompts)} | {scorer_name(task.gold)} | {learned} | {task.max_new_tokens} | "
            f"{task.recommended or 'not measured'} |"
        )
        if args.measure:
            from agents.evaluate import evaluate_base_model

            gold = evaluate_base_model(
                name,
                args.model,
                args.measure,
                seed=args.seed,
                max_prompt_tokens=args.max_prompt_tokens,
                max_new_tokens=args.max_new_tokens,
            ).gold_score
            row += f" {gold.mean():+.3f} ± {gold.std():.3f} |"
        print(row, flush=True)
    if not args.measure:
        print(
            "\nThe base model's gold on each: textgen tasks --measure 32 (sampled, as training samples; minutes), "
            "or with BLEU/ROUGE/chrF and after training: python benchmarks/tasks.py (benchmarks/results/tasks.md)."
        )


def _rollout(args: argparse.Namespace) -> None:
    import gymnasium as gym

    import text_env  # noqa: F401  (registers TextGen-v0)
    from agents.policies import CausalLMPolicy

    env = gym.make(
        "TextGen-v0", model=args.model, task=args.task, reward_model=args.reward_model,
        max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    policy = CausalLMPolicy(env.observation_space, env.action_space, lambda _: 0.0, model=args.model)
    policy.set_training_mode(False)
    for episode in range(args.episodes):
        obs, info = env.reset(seed=args.seed + episode)
        done = False
        while not done:
            action, _ = policy.predict({k: v[None] for k, v in obs.items()})
            obs, reward, terminated, truncated, info = env.step(int(action[0]))
            done = terminated or truncated
        print(f"\nprompt:     {info['prompt']}\ncompletion: {info['completion']}")
        print(f"reward (reward model): {reward:+.3f}   gold score: {info['gold_score']:+.3f}")


def _preferences(args: argparse.Namespace) -> None:
    from text_env.models import load_causal_lm, load_tokenizer
    from text_env.rewards.annotators import HumanAnnotator, SimulatedAnnotator
    from text_env.rewards.preferences import generate_pairs
    from text_env.tasks import get_task

    task = get_task(args.task)
    model = args.model
    if args.init is not None:
        from agents.run import TrainConfig

        model = TrainConfig(init=args.init, model=args.model).model  # RUN/model, checked
    annotator = HumanAnnotator() if args.annotator == "human" else SimulatedAnnotator(task.gold, args.beta, args.seed)
    pairs = generate_pairs(
        load_causal_lm(model), load_tokenizer(model), task.examples("train"), annotator, args.out, args.pairs,
        instruction=task.instruction, max_new_tokens=args.max_new_tokens or task.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    print(f"{len(pairs)} preference pairs in {args.out}")


def _prompt_count(text: str) -> int:
    """``--measure``: how many eval prompts, a count >= 1 (a usage error before any model is loaded)."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of prompts (a whole number >= 1)")
    return count


def _layer(text: str) -> int | list[int] | None:
    """``--layer``: ``0`` (the last layer: ``None``), one block count, or a comma-separated list of them; checked by
    :class:`RewardModelConfig` itself, so that a bad value is a usage error before any pairs are read."""
    from text_env.rewards.reward_model import RewardModelConfig

    try:
        layers = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block count or a list like 1,20") from None
    layer = None if layers == [0] else layers[0] if len(layers) == 1 else layers
    try:
        RewardModelConfig(layer=layer)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err} (0 on the command line means the last)") from None
    return layer


def _train_rm(args: argparse.Namespace) -> None:
    from agents.train import json_safe
    from text_env.rewards.preferences import load_preferences
    from text_env.rewards.reward_model import RewardModelConfig
    from text_env.rewards.training import train_reward_model
    from text_env.tasks import get_task

    pairs = load_preferences(args.data)
    config = RewardModelConfig(
        backbone=args.backbone, mode=args.mode, pooling=args.pooling, head_hidden=args.head_hidden, layer=args.layer,
        ensemble=args.ensemble,
    )  # fmt: skip
    gold = get_task(args.task).gold if args.task else None
    model, report = train_reward_model(
        pairs, config, gold=gold, epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
        validation=args.validation, test=args.test, seed=args.seed,
    )  # fmt: skip
    model.save(args.out)
    record = json_safe(dataclasses.asdict(report))
    record["split"] = {  # text_env.rewards.training.split_pairs: train fits, validation chooses, test reports
        "validation": args.validation, "test": args.test, "seed": args.seed
    }  # fmt: skip
    (Path(args.out) / "report.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    large_gap = (
        f"{report.gold_accuracy_large_gap:.3f} on the {report.n_large_gap} pairs whose gold differs by >= 0.5"
        if report.n_large_gap
        else "no pair's gold differs by >= 0.5"
    )
    print(
        f"test split ({report.n_heldout} pairs, never used to fit or choose): pairwise accuracy {report.accuracy:.3f} "
        f"(labels), {report.gold_accuracy:.3f} (noise-free gold), {large_gap}; Spearman vs gold {report.spearman:.3f}. "
        f"Validation accuracy {report.validation_accuracy:.3f} ({report.n_validation} pairs); {report.n_train} "
        f"train pairs; {report.seconds:.0f} s. Saved to {args.out}"
    )
    if report.members:
        print(
            f"ensemble of {report.ensemble} heads, scored above by their mean (choose the aggregation at load time: "
            "RewardModel.load(dir, aggregate='mean'|'min'|'mean_minus_var', lam=...)); each member on the test split: "
            + "; ".join(
                f"#{i} {m.accuracy:.3f} (labels), {m.gold_accuracy:.3f} (gold), {m.gold_accuracy_large_gap:.3f} "
                f"(large gap), Spearman {m.spearman:.3f}, weight decay {m.weight_decay:g}"
                for i, m in enumerate(report.members)
            )
        )


def _export(args: argparse.Namespace) -> None:
    from agents.policies import export_pretrained
    from agents.run import algorithm_class

    if Path(args.model_zip).is_dir():  # an RLlib checkpoint (algo.save_to_path) or an --engine rllib run directory
        from agents.rllib import export_rllib

        print(f"exported to {export_rllib(args.model_zip, args.out)}")
        return
    config = Path(args.model_zip).with_name("config.json")  # a model.zip does not name its algorithm; its run does
    algo = args.algo or (json.loads(config.read_text())["algo"] if config.is_file() else "ppo")
    policy = algorithm_class(algo).load(args.model_zip, device="cpu").policy
    print(f"exported to {export_pretrained(policy, args.out)}")


def _add_server_options(p: argparse.ArgumentParser, port: int, html: bool = False) -> None:
    """``--host``, ``--port`` and ``--token`` of a command that serves a page (with ``html``, only when asked to
    beside ``--html``: ``--port`` is then ``None`` unless given)."""
    from agents.web import LOOPBACK

    p.add_argument("--host", default=LOOPBACK, help="interface to listen on; off loopback a token is required")
    note = f"{port}; with --html only when given" if html else str(port)
    p.add_argument(
        "--port", type=int, default=None if html else port, help=f"port to serve on (0: any free one; default {note})"
    )
    p.add_argument("--token", default=None, help="the secret the URL must carry (default: random off loopback)")


def _add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "label",
        help="label preference pairs on a local web page (A / B / tie / skip, keyboard shortcuts)",
        description="Serve a page that shows two completions under their prompt; each label is appended to --data "
        "(A/B as preference lines that train-rm reads; ties and skips to <data stem>.undecided.jsonl) and synced to "
        "disk at once, so a restart resumes at the first pair the annotator has not labelled. The pairs come from "
        "--pairs, or are sampled with --model. Shows progress, agreement between annotator ids and with the task's "
        "gold scorer.",
    )
    p.add_argument("--data", required=True, help="preference JSONL that labels are appended to (made if missing)")
    p.add_argument(
        "--pairs", help="JSONL of pairs to label (prompt, a, b; or prompt, chosen, rejected to relabel); with --model, "
        "where the samples are written (default: <data stem>.to-label.jsonl), reused if it exists",
    )  # fmt: skip
    p.add_argument("--model", help="sample the pairs: 'default', a model directory or hub id, or a run directory")
    p.add_argument(
        "--task", default="positive-review", help="prompts to sample; its gold scorer is shown (%(default)s)"
    )
    p.add_argument("--n-pairs", type=int, default=32, help="pairs to sample with --model (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="sampled completion length (the task's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled prompts and completions")
    p.add_argument("--annotator", default=None, help="annotator id the page starts with (default: your user name)")
    _add_server_options(p, 8765)


def _label(args: argparse.Namespace) -> None:

    from agents.labeling import LabelStore, load_pairs_to_label, make_labeling_app, sample_pairs_to_label
    from agents.web import access_token, serve
    from text_env.tasks import get_task

    data = Path(args.data)
    if args.model is None and args.pairs is None:
        raise ValueError("give the pairs to label (--pairs FILE), or a model to sample them from (--model)")
    pairs_file = Path(args.pairs or data.with_name(f"{data.stem}.to-label.jsonl"))
    if args.model is not None and not pairs_file.is_file():
        pairs = sample_pairs_to_label(
            args.model, pairs_file, args.task, args.n_pairs, max_new_tokens=args.max_new_tokens, seed=args.seed
        )
        print(f"sampled {len(pairs)} pairs from {args.model} into {pairs_file}")
    else:
        pairs = load_pairs_to_label(pairs_file)
    token = access_token(args.host, args.token)
    store = LabelStore(pairs, data, get_task(args.task).gold)
    annotator = _annotator_id(args.annotator)
    stats = store.stats(annotator)
    print(f"{stats['total']} pairs from {pairs_file}; {stats['labelled']} judged so far; labels go to {data}")
    serve(make_labeling_app(store, token, annotator), args.host, args.port, token, "labeling page")


def _annotator_id(given: str | None) -> str:
    """The annotator id a page starts with: the one given, else the user's name as an id (letters, digits, .@+-_)."""
    import getpass
    import re

    return given or re.sub(r"[^\w.@+-]", "_", getpass.getuser())[:64]


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-token view of a trained run: base vs trained completions coloured by KL, log-prob or value",
        description="For held-out prompts of a saved run (textgen train or rlhf), sample a completion from the base "
        "model and from the trained policy, and colour every token by its KL contribution log pi - log pi_ref, the "
        "policy's log-prob or the value estimate, beside each completion's reward-model and gold score. Serves the "
        "page (--port), or writes it as one self-contained file (--html). From Python: agents.inspection.inspect_run.",
    )
    p.add_argument("run_dir", help="the run directory (config.json and model.zip)")
    p.add_argument("--prompts", type=int, default=8, help="how many prompts of the split (%(default)s)")
    p.add_argument("--split", choices=["eval", "train"], default="eval", help="prompt split (%(default)s: held out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled completions")
    p.add_argument("--html", metavar="OUT_HTML", help="write the page to this file (serves it only if --port is given)")
    _add_server_options(p, _INSPECT_PORT, html=True)


def _inspect(args: argparse.Namespace) -> None:
    from agents.inspection import inspect_run, make_inspection_app, render_html
    from agents.web import access_token, serve

    if args.prompts < 1:
        raise ValueError(f"--prompts must be at least 1, got {args.prompts}")
    token = access_token(args.host, args.token)  # refuse a bad --token before the minutes of sampling
    inspection = inspect_run(args.run_dir, n_prompts=args.prompts, split=args.split, seed=args.seed)
    for name, values in inspection.summary().items():
        print(f"{name:8s} reward model {values['reward_model_score']:+.3f}  gold {values['gold_score']:+.3f}  "
              f"KL {values['kl']:.2f} nats")  # fmt: skip
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(render_html(inspection), encoding="utf-8")
        print(f"wrote {args.html}")
        if args.port is None:
            return
    serve(make_inspection_app(inspection, token), args.host, _INSPECT_PORT if args.port is None else args.port, token,
          "inspection page")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``textgen`` argument parser: every subcommand and its options."""
    parser = argparse.ArgumentParser(
        prog="textgen",
        description="RLHF as ordinary RL: a token-level Gymnasium env (TextGen-v0), learned reward models and SB3 "
        "policies backed by causal LMs. Runs offline on the embedded SmolLM2-135M-Instruct.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_rlhf(sub)
    _add_sft(sub)
    from agents.run import ALGORITHMS

    p = sub.add_parser("tasks", help="list the tasks: what each asks, its data, splits, gold scorer and reward model")
    p.add_argument(
        "--measure", type=_prompt_count, default=0, metavar="N",
        help="also measure --model's gold on each task's first N eval prompts (sampled at temperature 1)",
    )  # fmt: skip
    p.add_argument("--model", default="default", help="the model --measure samples: 'default', a directory or hub id")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="--measure: room for prompts (each task's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="--measure: completion length (each task's)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("rollout", help="sample a few episodes of TextGen-v0 with the base model and show rewards")
    p.add_argument("--model", default="default", help="'default', a directory or a hub id")
    p.add_argument("--task", default="positive-review")
    p.add_argument("--reward-model", default=None, help="reward-model directory or 'gold' (default: task's)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="room for the prompt (task's default)")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("preferences", help="sample completion pairs from an LM and label them (JSONL, resumable)")
    p.add_argument("--task", default="positive-review")
    p.add_argument("--model", default="default", help="the LM that writes the completions")
    p.add_argument(
        "--init", metavar="SFT_RUN", default=None,
        help="sample a textgen sft run's model (the distribution PPO with --init starts from), instead of --model",
    )  # fmt: skip
    p.add_argument("--pairs", type=int, default=2000, help="pairs wanted in --out (%(default)s)")
    p.add_argument("--out", required=True, help="JSONL file; appended to, so a rerun resumes")
    p.add_argument("--annotator", choices=["simulated", "human"], default="simulated")
    p.add_argument("--beta", type=float, default=10.0, help="Bradley-Terry sharpness of simulated labels")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="generation batch (%(default)s)")
    p.add_argument("--seed", type=int, default=0)

    from text_env.rewards.reward_model import RewardModelConfig

    p = sub.add_parser("train-rm", help="train a reward model on preference pairs (Bradley-Terry)")
    p.add_argument("--data", required=True, help="JSONL file of prompt/chosen/rejected, or hf:NAME")
    p.add_argument("--out", required=True, help="directory to save the reward model")
    p.add_argument("--backbone", default="default", help="LM whose hidden states are scored")
    p.add_argument("--mode", choices=["head", "lora", "full"], default="head", help="what is trained (%(default)s)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--head-hidden", type=int, default=0, help="hidden width of the head (0: linear)")
    p.add_argument(
        "--layer", type=_layer, default=RewardModelConfig.layer, metavar="K[,K...]",
        help="score hidden states after this many blocks (0: the last, normalised), or after several, their "
        "pooled states side by side (e.g. 1,20; default: 0)",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", type=int, default=1, metavar="K",
        help="K heads on the same frozen features, each fitted on a bootstrap resample of the train split; "
        "scores aggregate by mean, min or mean - lam * var, chosen at load time (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--validation", type=float, default=0.1, help="fraction of pairs that choose (%(default)s)")
    p.add_argument("--test", type=float, default=0.2, help="fraction of pairs only reported on (%(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="lora/full: most epochs (%(default)s)")
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--task", default="positive-review", help="task whose gold scorer grades the held-out pairs")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="write a trained policy's LM with save_pretrained (for transformers)")
    p.add_argument("model_zip", help="the model.zip of a run, or an --engine rllib run directory / RLlib checkpoint")
    p.add_argument("out", help="output directory")
    p.add_argument("--algo", choices=ALGORITHMS, help="default: the run's (config.json beside model.zip), else ppo")

    _add_label(sub)
    _add_inspect(sub)
    _add_evaluate(sub)
    return parser


def _add_sft(sub: argparse._SubParsersAction) -> None:
    """``textgen sft``'s options are SFTConfig's fields."""
    from agents.sft import SFTConfig

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on a task's references (LoRA), the model textgen train --init starts PPO from",
        description="Fine-tune on prompt -> reference records of the task's train split (or --prompts FILE "
        "--reference-column C), the loss on the reference tokens only, with transformers' Trainer; a validation "
        "slice of the train split stops it early. Evaluates held-out gold and the perplexity of held-out references "
        "before and after, and saves the merged model in RUN_DIR/model. Ctrl-C saves a checkpoint; --resume RUN_DIR "
        "continues it. Tasks without references (concepts, positive-review) are refused.",
    )
    _add_fields(p, SFTConfig)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (its settings come from there)")


def _sft(args: argparse.Namespace) -> None:
    from agents.sft import SFTConfig, sft

    given = _given(args, SFTConfig)
    if args.resume:
        _refuse_settings_with_resume(args, given, "")
        sft(resume=args.resume)
        return
    sft(SFTConfig(**given))


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare models on the same prompts: metrics with bootstrap intervals, or a blind A/B page for people",
        description="Sample every MODEL (a run directory of textgen train / rlhf / sft or --engine rllib, a directory "
        "saved with save_pretrained, 'default' or a hub id) on the same prompts with the same seed; score each "
        "completion with the task's gold and reward model, BLEU / chrF / ROUGE-1/2/L when the prompts have "
        "references, pass@1 for code, KL and perplexity against --reference, distinct-n and length; print one table "
        "with a 95 % bootstrap interval on each mean and a paired bootstrap interval on each model's difference from "
        "the first, and save it (markdown and JSON). With --human and two models: serve the labeling page in a blind "
        "A/B mode and report the win rate of A over B with a Wilson interval.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="run directory, model directory, 'default' or hub id")
    p.add_argument("--task", default=None, help="gold scorer, reward model and prompts (default: the first run's task)")
    p.add_argument("--prompts", default=None, help="a .jsonl / .txt file (or hf:NAME) of prompts instead of the task's")
    p.add_argument("--reference-column", default=None, help="the --prompts field holding each prompt's reference(s)")
    p.add_argument("--n-prompts", type=int, default=None, help="the first N prompts (default: a run's 80 eval prompts)")
    p.add_argument("--samples", type=int, default=1, help="completions per prompt: best-of-K and mean-of-K rows")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    p.add_argument("--reference", default=None, help="KL / perplexity reference LM (default: the first model's base)")
    p.add_argument("--reward-model", default=None, help="reward-model directory or 'gold' (default: the first run's)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default: each run's / task's)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="room for the prompt (default: the task's)")
    p.add_argument("--out", default="evaluations", help="where the report directory goes (%(default)s)")
    p.add_argument("--human", action="store_true", help="blind A/B page for two models (the 'label' extra)")
    p.add_argument("--data", default=None, help="--human: the judgements JSONL (appended to; a restart resumes)")
    p.add_argument("--annotator", default=None, help="--human: the annotator id the page starts with")
    _add_server_options(p, 8767)


def _evaluate(args: argparse.Namespace) -> None:
    from agents.compare import compare_models, save_comparison

    if args.human and (len(args.models) != 2 or args.data is None):
        raise ValueError("--human compares two models, A and B, and needs --data FILE for the judgements")
    for name in ("n_prompts", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    settings = dict(
        task=args.task, prompts=args.prompts, reference_column=args.reference_column, n_prompts=args.n_prompts,
        samples=args.samples, seed=args.seed, reference=args.reference, reward_model=args.reward_model,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
    )  # fmt: skip
    if args.human:
        _evaluate_by_people(args, settings)
        return
    comparison = compare_models(args.models, **settings)
    run_dir = save_comparison(comparison, args.out)
    print(comparison.markdown())
    print(f"\nsaved to {run_dir}")


def _evaluate_by_people(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Sample A and B once (kept beside --data), then serve the blind A/B page; print the report when it stops."""
    import signal

    from agents.ab_test import ab_report, markdown, pairs_path, write_ab_pairs
    from agents.compare import compare_models, describe_model, save_comparison
    from agents.labeling import LabelStore, load_pairs_to_label, make_labeling_app
    from agents.web import access_token, serve
    from text_env.tasks import get_task

    token = access_token(args.host, args.token)  # a bad --token is refused before minutes of sampling
    pairs_file = pairs_path(args.data)
    if pairs_file.is_file():
        pairs = load_pairs_to_label(pairs_file)
    else:
        comparison = compare_models(args.models, **settings)
        print(comparison.markdown())
        print(f"\nsaved to {save_comparison(comparison, args.out)}")
        a, b = (comparison.completions[m] for m in args.models)
        pairs = write_ab_pairs(comparison.examples, a, b, pairs_file, args.models)
    task = settings["task"] or describe_model(args.models[0]).config.task
    store = LabelStore(pairs, args.data, get_task(task).gold)
    annotator = _annotator_id(args.annotator)
    print(f"{len(pairs)} pairs from {pairs_file}; judgements go to {args.data}; the models stay hidden on the page")

    def stop(signum: int, frame: Any) -> None:  # uvicorn stops, then raises the signal again: end here, not die
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        serve(make_labeling_app(store, token, annotator), args.host, args.port, token, "A/B page")
    except KeyboardInterrupt:
        pass  # Ctrl-C or SIGTERM stopped the page: what was judged is on disk, and the report follows
    finally:
        signal.signal(signal.SIGTERM, previous)
        report = ab_report(store, pairs_file)
        store.close()
    Path(args.data).with_suffix(".report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + markdown(report))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``textgen`` console script."""
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _train,
        "rlhf": _rlhf,
        "tasks": _tasks,
        "rollout": _rollout,
        "preferences": _preferences,
        "train-rm": _train_rm,
        "export": _export,
        "label": _label,
        "inspect": _inspect,
        "evaluate": _evaluate,
        "sft": _sft,
    }
    from text_env.extras import MissingExtra, require
    from text_env.models import ModelLoadError

    try:
        for extra, feature in _needed_extras(args):
            require(extra, feature)
        handlers[args.command](args)
    except KeyboardInterrupt:
        print("textgen: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        from agents.train import Interrupted

        if isinstance(error, Interrupted):
            print(f"textgen: {error}", file=sys.stderr)
            raise SystemExit(130) from None
        if args.debug or not isinstance(error, (*_USER_ERRORS, ModelLoadError)):
            raise
        if isinstance(error, MissingExtra):  # says all: what needs which extra, and how to install it
            print(error, file=sys.stderr)
            raise SystemExit(1) from None
        # A user's mistake (a bad option value, a missing file, an unloadable model) is one line, not a traceback.
        print(f"textgen {args.command}: error: {error} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("textgen-rl")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    main(sys.argv[1:])
