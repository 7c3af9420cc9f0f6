"""The ``worldpm-reward`` command line: score, demo, selftest.

Examples:
  worldpm-reward demo
  worldpm-reward score --model Qwen/WorldPM-72B --device-map auto data.jsonl -o scored.jsonl
  worldpm-reward selftest --model Qwen/WorldPM-72B --device-map auto
  worldpm-reward calibrate --model Qwen/WorldPM-72B --device-map auto prompts_and_replies.jsonl -o calib.json
  WORLDPM_REWARD_TOKEN=secret worldpm-reward serve --model Qwen/WorldPM-72B --device-map auto --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worldpm_reward.jsonl import json_line, line_error, read_lines
from worldpm_reward.shaping import Normalize, ReferenceMode

EPILOG = """examples:
  worldpm-reward demo                      # whole path on a built-in tiny checkpoint, nothing downloaded
  worldpm-reward score --model Qwen/WorldPM-72B --device-map auto in.jsonl -o out.jsonl
  worldpm-reward selftest --model Qwen/WorldPM-72B --device-map auto

input lines: {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
         or: {"prompt": "..." or [messages], "response": "..."}   (other fields are passed through)
"""


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The model flags, generated from ModelConfig's fields (names, types, choices, help)."""

    from worldpm_reward.config import ModelConfig, choices_of, cli_fields

    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="hub id or local checkpoint directory")
    hints = typing.get_type_hints(ModelConfig)
    for f in cli_fields(ModelConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, help_text = hints[f.name], f.metadata.get("help", "")
        if hint is bool:  # a flag that flips the default
            if f.default:
                g.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=help_text)
            else:
                g.add_argument(flag, action="store_true", help=help_text)
            continue
        choices = choices_of(hint)
        kinds = set(typing.get_args(hint)) or {hint}
        kind = int if int in kinds else float if float in kinds else str
        g.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)


def _model_config(args: argparse.Namespace) -> Any:
    from worldpm_reward.config import ModelConfig, cli_fields

    return ModelConfig(**{f.name: getattr(args, f.name) for f in cli_fields(ModelConfig)})


def _load(args: argparse.Namespace, model: str | None = None) -> Any:
    from worldpm_reward.scoring import RewardModel

    return RewardModel.from_pretrained(model or args.model, _model_config(args))


class UsageError(Exception):
    """A user error the CLI reports as one ``error: ...`` line (exit 2)."""


def _check_paths(args: argparse.Namespace) -> None:
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1; got {args.chunk_size}")
    if args.input != "-" and not Path(args.input).is_file():
        raise UsageError(f"input {args.input!r} is not a file")
    if args.output != "-":
        out = Path(args.output)
        if out.is_dir():
            raise UsageError(f"-o {args.output!r} is a directory; give a file name")
        if args.input != "-" and out.exists() and out.resolve() == Path(args.input).resolve():
            raise UsageError(f"-o {args.output!r} is the input file; writing it would destroy the input")
        if not out.resolve().parent.is_dir():
            raise UsageError(f"-o {args.output!r}: the folder {str(out.resolve().parent)!r} does not exist")


def cmd_score(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    _check_paths(args)
    rm = _load(args)
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    dst = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    total = bad = truncated = 0
    rows = read_lines(src)
    bar = tqdm(unit="sample", desc="scoring", disable=None, file=sys.stderr)
    try:
        while chunk := list(itertools.islice(rows, args.chunk_size)):  # streamed: chunk by chunk
            objs = [o for _, o in chunk if isinstance(o, dict)]
            results = iter(rm.score_detailed(objs, progress=bar.update) if objs else [])
            for lineno, obj in chunk:
                if isinstance(obj, str):
                    out: dict[str, Any] = {"score": None, "error": obj}
                    bar.update(1)
                else:
                    r = next(results)
                    # our fields are rewritten: a stale "error" or "score" from the input never survives
                    out = {k: v for k, v in obj.items() if k not in ("score", "error")}
                    score = r.score if r.score is None or math.isfinite(r.score) else None
                    out["score"] = score
                    if r.error is not None:
                        out["error"] = line_error(lineno, r.error)
                    elif score is None:
                        out["error"] = f"line {lineno}: the model returned a non-finite score"
                    truncated += r.truncated
                bad += out["score"] is None
                total += 1
                dst.write(json_line(out))
            dst.flush()
        bar.close()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if dst is not sys.stdout:
            dst.close()
    print(
        f"scored {total - bad} of {total} lines; {bad} with errors; {truncated} truncated to max_length={rm.max_length}",
        file=sys.stderr,
    )
    return 1 if (args.strict and bad) else 0


DEMO_CONVERSATIONS: list[dict[str, Any]] = [
    {
        "prompt": "Tips for better sleep?",
        "response": "Keep a consistent schedule, avoid screens before bed, and keep the room cool.",
    },
    {"prompt": "Tips for better sleep?", "response": "just try sleeping earlier lol"},
    {
        "messages": [
            {"role": "user", "content": "Translate 'good morning' into French."},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "And into Chinese?"},
            {"role": "assistant", "content": "早上好！"},
        ]
    },
    {"prompt": "What is 2 + 2?", "response": ""},  # invalid on purpose: shows a per-sample error
]


def cmd_demo(args: argparse.Namespace) -> int:
    from worldpm_reward.scoring import RewardModel
    from worldpm_reward.testing import demo_checkpoint

    path = demo_checkpoint()
    print(f"built-in tiny WorldPM-layout checkpoint (real Qwen2 vocabulary, random weights): {path}")
    rm = RewardModel.from_pretrained(path, device=args.device or "cpu")
    results = rm.score_detailed(DEMO_CONVERSATIONS)
    alone = [rm.score_detailed([c])[0].score for c in DEMO_CONVERSATIONS]
    print(f"{'#':>2}  {'score (batch)':>14}  {'score (alone)':>14}  {'tokens':>6}  reply / error")
    for i, (r, a, c) in enumerate(zip(results, alone, DEMO_CONVERSATIONS)):
        reply = (c.get("response") or c.get("messages", [{}])[-1].get("content", ""))[:48]
        if r.ok:
            print(f"{i:>2}  {r.score:>14.6f}  {a:>14.6f}  {r.num_tokens:>6}  {reply!r}")
        else:
            print(f"{i:>2}  {'-':>14}  {'-':>14}  {'-':>6}  error: {r.error}")
    drift = max(abs((r.score or 0.0) - (a or 0.0)) for r, a in zip(results, alone))
    print(f"max |batch - alone| = {drift:.2e} (scores are raw; random tiny weights make them meaningless)")
    print("next: worldpm-reward score --model Qwen/WorldPM-72B --device-map auto in.jsonl -o out.jsonl")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from worldpm_reward.selftest import run_selftest

    report = run_selftest(_load(args), args.model, args.tolerance)
    print("\n".join([*report.lines, report.verdict]))
    return 0 if report.ok else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from worldpm_reward.rewards import RewardFunction
    from worldpm_reward.shaping import RunningStats, ShapingConfig, write_calibration

    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1; got {args.chunk_size}")
    rm = _load(args)
    with open(args.input, "rb") as f:
        rows = [o for _, o in read_lines(f) if isinstance(o, dict)]
    reward = RewardFunction(rm, ShapingConfig(reference=args.reference))
    stats = RunningStats()
    errors = 0
    for start in range(0, len(rows), args.chunk_size):
        batch = reward(rows[start : start + args.chunk_size])
        stats.update([v for v in batch.rewards if v is not None])
        errors += sum(v is None for v in batch.rewards)
    if stats.count < 2:
        print(f"error: only {stats.count} scorable lines in {args.input}; need at least 2", file=sys.stderr)
        return 1
    calib = write_calibration(args.output, stats, model=args.model, data=str(args.input))
    print(
        f"wrote {args.output}: mean {calib.mean:.6f}, std {calib.std:.6f} over {calib.count} samples ({errors} skipped)"
    )
    return 0


def _add_shaping_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reward shaping (the 'reward' field; raw scores are always returned too)")
    g.add_argument("--normalize", default="none", choices=typing.get_args(Normalize))
    g.add_argument("--calibration-file", default=None, help="for --normalize fixed (see 'calibrate')")
    g.add_argument("--clip-min", type=float, default=None)
    g.add_argument("--clip-max", type=float, default=None)
    g.add_argument(
        "--reference",
        default="none",
        choices=typing.get_args(ReferenceMode),
        help="reward relative to a reference answer (OpenRLHF 'labels', or a sample's 'reference')",
    )
    g.add_argument(
        "--normalize-state",
        default=None,
        metavar="PATH",
        help="--normalize running: keep the statistics in this file (restored at start; replicas "
        "given the same file on a shared filesystem share one set of statistics)",
    )
    g.add_argument(
        "--normalize-sync", type=float, default=5.0, help="seconds between merges into --normalize-state"
    )
    g.add_argument(
        "--normalize-state-reset",
        action="store_true",
        help="an invalid --normalize-state file (or another model's) is set aside with a warning and the "
        "statistics start over (default: refuse to start, naming the file and field)",
    )


def _shaping(args: argparse.Namespace) -> Any:
    from worldpm_reward.shaping import ShapingConfig

    return ShapingConfig(
        normalize=args.normalize,
        calibration_file=args.calibration_file,
        clip_min=args.clip_min,
        clip_max=args.clip_max,
        reference=args.reference,
        state_file=args.normalize_state,
        state_sync_s=args.normalize_sync,
        state_model=_model_identity(args) if args.normalize_state else None,
        state_reset=args.normalize_state_reset,
    )


def _model_identity(args: argparse.Namespace) -> str:
    """Which model a state file's statistics belong to: the family and the checkpoint (a local
    directory's absolute path, or the hub id and revision)."""
    path = Path(args.model)
    family = args.family
    if path.is_dir():
        checkpoint = str(path.resolve())
        if family == "auto":
            try:
                archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures")
                family = str(archs[0]) if archs else "auto"
            except (OSError, ValueError, TypeError, IndexError, AttributeError):
                family = "auto"
    else:
        checkpoint = args.model + (f"@{args.revision}" if args.revision else "")
    return f"{family}:{checkpoint}"


def _server_flag(f: Any) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def _add_server_args(p: argparse.ArgumentParser) -> None:
    """The serve flags, generated from ServerConfig's fields (names, types, defaults, help; a
    field's metadata may rename its flag, scale its unit, or read 0 as None)."""
    from worldpm_reward.serving.config import ServerConfig

    hints = typing.get_type_hints(ServerConfig)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = meta.get("group")
        g = p if group is None else groups.setdefault(group, p.add_argument_group(group))
        flag, hint, help_text = _server_flag(f), hints[f.name], meta.get("help", "")
        if hint is bool:
            g.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kinds = set(typing.get_args(hint)) or {hint}
        scale = meta.get("scale")
        default = f.default
        if scale:  # e.g. bytes as MiB on the command line
            kind: Any = float
            default = default / scale  # type: ignore[operator]
        elif float in kinds and type(None) in kinds:  # a number, or 'none'
            kind = _number_or_none
        elif int in kinds:
            kind = int
        elif float in kinds:
            kind = float
        else:
            kind = str
        choices = meta.get("choices") or (
            typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        )
        metavar = (
            None if choices else flag[2:].replace("-", "_").upper()
        )  # the flag's unit (MB), not the field's
        g.add_argument(
            flag, dest=f.name, type=kind, default=default, choices=choices, metavar=metavar, help=help_text
        )


def _number_or_none(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _server_config(args: argparse.Namespace) -> Any:
    from worldpm_reward.serving.config import ServerConfig

    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("scale"):
            value = int(value * f.metadata["scale"])
        if f.metadata.get("zero_none") and not value:
            value = None
        values[f.name] = value
    return ServerConfig(**values)


def cmd_serve(args: argparse.Namespace) -> int:
    from worldpm_reward.serving.app import run_server

    config = _server_config(args)
    for flag, value in (
        ("--scorer-timeout", args.scorer_timeout),
        ("--heartbeat-timeout", args.heartbeat_timeout),
        ("--max-batch-samples", args.max_batch_samples),
    ):
        if not value > 0:
            raise UsageError(f"{flag} must be positive; got {value}")
    shaping = _shaping(args)
    if args.in_process:
        run_server(lambda: _load(args), config, shaping)
        return 0
    import functools

    from worldpm_reward.scoring import RewardModel
    from worldpm_reward.serving.scorer_process import ProcessScorer

    factory = functools.partial(RewardModel.from_pretrained, args.model, _model_config(args))
    scorer = functools.partial(
        ProcessScorer,
        factory,
        call_timeout_s=args.scorer_timeout,
        call_timeout_per_ktoken_s=args.scorer_timeout_per_ktoken,
        heartbeat_timeout_s=args.heartbeat_timeout,
    )
    run_server(scorer, config, shaping)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worldpm-reward",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "score",
        help="score a JSONL file",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("input", help="input JSONL ('-' for stdin)")
    p.add_argument(
        "-o", "--output", required=True, help="output JSONL ('-' for stdout): each input line plus 'score'"
    )
    p.add_argument("--strict", action="store_true", help="exit non-zero if any line could not be scored")
    p.add_argument("--chunk-size", type=int, default=4096, help="lines scored per call (bounds memory)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "calibrate", help="write mean/std of scores on a data set, for shaping normalize='fixed'"
    )
    _add_model_args(p)
    p.add_argument("input", help="JSONL in the 'score' input format (with 'reference' for --reference)")
    p.add_argument("-o", "--output", required=True, help="calibration JSON to write")
    p.add_argument(
        "--reference",
        default="none",
        choices=typing.get_args(ReferenceMode),
        help="calibrate reference-relative rewards instead of raw scores",
    )
    p.add_argument("--chunk-size", type=int, default=4096)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "serve", help="serve a reward model over HTTP (OpenRLHF /get_reward, /v1/score) with batching"
    )
    _add_model_args(p)
    _add_server_args(p)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the model in the server process (default: a child process, so HTTP handling "
        "never waits for the model's GIL)",
    )
    g = p.add_argument_group("the scorer process (a hung or dying scorer never hangs the server)")
    g.add_argument(
        "--scorer-timeout",
        type=float,
        default=120.0,
        help="seconds a model call may take before the scorer process is killed and restarted, plus "
        "--scorer-timeout-per-ktoken per 1,000 tokens of the call (its requests get 503 + Retry-After)",
    )
    g.add_argument("--scorer-timeout-per-ktoken", type=float, default=2.0, help="see --scorer-timeout")
    g.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=15.0,
        help="a scorer process silent this long (stopped, frozen) is killed and restarted",
    )
    _add_shaping_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("openrlhf-file", help="print the path of the OpenRLHF reward-function file")
    p.set_defaults(
        func=lambda args: (
            print(__import__("worldpm_reward.integrations.openrlhf", fromlist=["x"]).REWARD_FUNC_FILE) or 0
        )
    )

    p = sub.add_parser("verl-file", help="print the path of the veRL custom reward function file")
    p.set_defaults(func=lambda args: print(Path(__file__).with_name("integrations") / "verl.py") or 0)

    p = sub.add_parser("demo", help="run the whole path on a built-in tiny checkpoint (nothing downloaded)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("selftest", help="check a real checkpoint against the model card's known answers")
    _add_model_args(p)
    p.add_argument(
        "--tolerance", type=float, default=0.05, help="absolute tolerance on known answers (bf16 drift)"
    )
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    from worldpm_reward.errors import WorldPMRewardError

    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `... -o - | head -1`: the reader has gone; end quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    # ImportError names the extra; OSError: unreadable/unwritable files; ValueError: bad values
    except (WorldPMRewardError, UsageError, OSError, ImportError, ValueError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
