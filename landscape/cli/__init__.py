"""The ``landscape`` command line. Every command has ``--help``.

Commands are registered in :data:`COMMANDS`; each is a function ``(args) -> int`` with an
``add_arguments(parser)`` companion, so later modules add commands without touching the parser code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: list[Command] = []


def command(name: str, help: str):
    """Register ``fn(args) -> int`` as a subcommand; ``fn.add_arguments(parser)`` declares its flags."""

    def wrap(fn):
        fn.help = help
        COMMANDS.append((name, lambda p: fn.add_arguments(p), fn))
        return fn

    return wrap


def default_seq_len(info) -> int:
    """Default segment length of a model: 512 for smollm2-135m, else its context (at most 256)."""
    return 512 if info.name == "smollm2-135m" else min(256, info.context_length or 256)


def format_arg(text: str):
    """argparse type: a :class:`~landscape.quant.formats.QuantFormat` (bad names fail before any work)."""
    from landscape.quant.formats import parse_format

    try:
        return parse_format(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ----------------------------------------------------------------------------------------------- eval
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m, ref-small, ref-tiny, a hub id or a local directory")
    p.add_argument("--corpus", action="append", default=None,
                   help="held-out corpus (repeatable): wiki (in-domain), sotu (out-of-domain); default both")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per segment (default 512 smollm2, else 256)")
    p.add_argument("--segments", type=int, default=24, help="number of held-out segments (default 24)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: seq-len, disjoint windows)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rtn", action="append", default=[], metavar="FORMAT", type=format_arg,
                   help="also evaluate round-to-nearest at this format (repeatable), e.g. int4, int3-g64")
    p.add_argument("--json", action="store_true", help="print one JSON object per result")


@command("eval", "held-out NLL of a model (with its convention), optionally after round-to-nearest")
def cmd_eval(args: argparse.Namespace) -> int:
    from landscape.data import heldout_set
    from landscape.models import load_model
    from landscape.objectives import nll

    corpora = args.corpus or ["wiki", "sotu"]
    t0 = time.time()
    lm = load_model(args.model)
    load_s = time.time() - t0
    seq_len = args.seq_len or default_seq_len(lm.info)
    sets = [heldout_set(lm.tokenizer, seq_len, c, args.segments, args.stride, lm.info.context_length) for c in corpora]
    if not args.json:
        print(f"model {lm.info.name} ({lm.info.source}; {lm.info.n_params:,} parameters; loaded in {load_s:.1f} s)")
        if lm.info.caveat:
            print(f"caveat: {lm.info.caveat}")
    variants: list[tuple[str, dict | None]] = [("fp32", None)]
    if args.rtn:
        from landscape.quant import rtn

        for fmt in args.rtn:  # parsed (and so checked) by argparse, before the model loads
            variants.append((f"rtn {fmt.name}", rtn(lm.model, fmt).weights))
    from landscape.weights import swapped_weights

    for label, weights in variants:
        for data in sets:
            t = time.time()
            with swapped_weights(lm.model, weights or {}):
                r = nll(lm.model, data, batch_size=args.batch_size, model_name=lm.info.name)
            if args.json:
                print(json.dumps({"variant": label, "nll": r.value, "seconds": time.time() - t,
                                  "convention": r.convention.to_dict()}))
            else:
                print(f"{label:>16}  {r.value:.4f}  ({r.convention.describe()}; {time.time() - t:.1f} s)")
    return 0


cmd_eval.add_arguments = _eval_args


# ---------------------------------------------------------------------------------------- build-model
def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a reference model name (ref-small, ref-tiny) or smollm2-135m (GGUF conversion)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")


@command("build-model", "train a reference model (or convert smollm2-135m) into the cache")
def cmd_build_model(args: argparse.Namespace) -> int:
    from landscape.models import smollm2_dir
    from landscape.refmodel import REF_CONFIGS, build_reference_model

    if args.name == "smollm2-135m":
        print(smollm2_dir())
        return 0
    if args.name not in REF_CONFIGS:
        print(f"error: cannot build {args.name!r}; buildable: smollm2-135m, {', '.join(sorted(REF_CONFIGS))}",
              file=sys.stderr)
        return 2
    path = build_reference_model(args.name, force=args.force)
    meta = json.loads((path / "landscape_build.json").read_text())
    print(f"{path}\nheld-out NLL {meta['heldout_nll']:.4f} ({meta['train_seconds']} s to train)")
    return 0


cmd_build_model.add_arguments = _build_args


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="landscape", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add_arguments, fn in COMMANDS:
        p = sub.add_parser(name, help=fn.help, description=fn.help)
        add_arguments(p)
        p.set_defaults(func=fn)
    return parser


def _load_command_modules() -> None:
    """Import modules that register further commands (kept lazy: heavy imports happen per command)."""
    import importlib

    for mod in ("landscape.cli.quantize", "landscape.cli.scan", "landscape.cli.compare", "landscape.cli.spectrum"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run through the package module so lazily registered commands share COMMANDS
    from landscape.cli import main as _main

    sys.exit(_main())
