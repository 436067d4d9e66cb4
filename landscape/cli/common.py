"""What the commands of ``landscape`` share: the command record, argument groups declared once, value parsers,
and loading a model with its held-out data.

Every command module exposes ``COMMANDS``, a tuple of :class:`Command`; :mod:`landscape.cli` builds one parser
from an explicit list of those modules (nothing registers itself on import).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from landscape import models
from landscape.cluster import EXECUTORS, ClusterSettings, SlurmSettings, Sweep, run_sweep
from landscape.data import (
    CORPORA,
    HELDOUT_MODULUS,
    HUB_CORPORA,
    TEXT_FORMATS,
    TokenSet,
    check_hub_corpus,
    heldout_set,
    text_corpus,
)
from landscape.engine.perturb import grid_axis
from landscape.models import LoadedModel, ModelInfo, parse_dtype, resolve_device
from landscape.quant.formats import parse_format
from landscape.weights import quantizable_layers, weight_matrix
from landscape.workload import DEFAULT_MAX_POINTS, WorkLimits, held_workload, parse_size

MODEL_HELP = "smollm2-135m, ref-small, ref-tiny, a hub id or a local directory"
# argparse takes "-1:1:21" for an option; let arguments that start like a negative number be values.
NEGATIVE_VALUE = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+(e[-+]?\d+)?:")

T = TypeVar("T")


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, the function declaring its flags, and the function running it
    (``run(args) -> exit status``)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------------ value parsers
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def checked(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a library parser: its ``ValueError`` becomes argparse's message, so a bad value
    fails when the arguments are parsed, before any work, in the library's own words."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = parse.__name__
    return convert


format_arg = checked(parse_format)  # a QuantFormat


MAX_AXIS_POINTS = 10_000_000  # one grid axis (parsed into an array at once)
MAX_COEFFICIENT = 1e4  # |a| of a grid point: a * u with ||u|| ~ ||w0|| leaves float range long before 1e30


def parse_grid(text: str) -> np.ndarray:
    """``START:STOP:COUNT`` -> ``COUNT`` evenly spaced coefficients from START to STOP inclusive."""
    parts = text.split(":")
    try:
        start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"grid must be START:STOP:COUNT with finite numbers and an integer "
                                         f"COUNT >= 1 (e.g. -1:1:21), got {text!r}") from None
    if count == 1 and start != stop:
        raise argparse.ArgumentTypeError(f"grid {text!r} has one point, so STOP {stop:g} would be dropped: "
                                         f"give START:START:1 for the single point {start:g}, or COUNT >= 2")
    if count > MAX_AXIS_POINTS:
        raise argparse.ArgumentTypeError(f"grid {text!r} has {count:,} points on one axis; at most "
                                         f"{MAX_AXIS_POINTS:,} are accepted (and --max-points bounds a run)")
    if max(abs(start), abs(stop)) > MAX_COEFFICIENT:
        raise argparse.ArgumentTypeError(
            f"grid {text!r} reaches {max(abs(start), abs(stop)):g}; coefficients are multiples of the "
            f"direction (a filter-normalised one is as large as w0 itself), so |a| <= {MAX_COEFFICIENT:g} is "
            f"accepted: beyond it the weights overflow and every NLL is nan")
    try:
        return grid_axis(start, stop, count)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"grid must be START:STOP:COUNT with finite numbers and an integer "
                                         f"COUNT >= 1 (e.g. -1:1:21), got {text!r} ({err})") from None


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(x) for x in text.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard must be i/n with 0 <= i < n (e.g. 0/4), "
                                         f"got {text!r}") from None
    return index, count


# ----------------------------------------------------------------------------------------- argument groups
dtype_arg = checked(parse_dtype)  # a dtype landscape computes in
device_arg = checked(resolve_device)  # a device this machine has
text_arg = checked(text_corpus)  # a user's text file, as a corpus name


def _corpus(text: str) -> str:
    if text not in CORPORA:
        raise ValueError(f"unknown corpus {text!r}; accepted: {', '.join(CORPORA)} (or --text FILE for your "
                         f"own)")
    check_hub_corpus(text)  # a hub corpus without `datasets` or a network fails here
    return text


corpus_arg = checked(_corpus)  # a built-in corpus name (landscape.data.CORPORA)


def text_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, use: str) -> None:
    """``--text FILE``: a user's own corpus for ``use``."""
    p.add_argument("--text", type=text_arg, default=None, metavar="FILE",
                   help=f"your own text for {use}: {TEXT_FORMATS}; split by document as the bundled wiki "
                        f"text is (1 in {HELDOUT_MODULUS} documents held out)")


def model_argument(p: argparse.ArgumentParser) -> None:
    """The positional ``model`` and where it computes, ``--device`` and ``--dtype`` (every command that loads
    a model)."""
    # private argparse attribute (3.11-3.13); no public hook exists
    p._negative_number_matcher = NEGATIVE_VALUE
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--device", type=device_arg, default="auto",
                   help="where the model computes: auto (cuda when available, else cpu), cpu, cuda, cuda:N, "
                        "mps")
    p.add_argument("--dtype", type=dtype_arg, default="float32",
                   help="the model's dtype: float32 (default), bfloat16, float16, float64")


def data_arguments(p: argparse.ArgumentParser, *, segments: int, batch_size: int = 4, stride: bool = True,
                   many_corpora: bool = False) -> None:
    """Held-out text: ``--corpus``, ``--seq-len``, ``--segments``, ``--stride`` (optional),
    ``--batch-size``."""
    g = p.add_argument_group("held-out data")
    built_in = f"{', '.join(CORPORA)}; {', '.join(HUB_CORPORA)} need a network"
    if many_corpora:
        g.add_argument("--corpus", action="append", default=None, type=corpus_arg,
                       help=f"held-out corpus (repeatable): {built_in}; default wiki (in-domain) and sotu "
                            f"(out-of-domain)")
    else:
        g.add_argument("--corpus", default="wiki", type=corpus_arg,
                       help=f"held-out corpus: {built_in}; default wiki")
    text_argument(g, "the held-out data (its held-out documents; replaces --corpus)")
    g.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per segment (default 512 for smollm2-135m, else min(256, context))")
    g.add_argument("--segments", type=positive_int, default=segments,
                   help=f"held-out segments of every evaluation (default {segments})")
    if stride:
        g.add_argument("--stride", type=positive_int, default=None, help="window stride (default: seq-len)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"segments per forward pass (memory only; default {batch_size})")


def store_arguments(p: argparse.ArgumentParser, *, required: bool = True, resume: bool = True) -> None:
    """``--out`` (an HDF5 store) and ``--resume``."""
    if required:
        p.add_argument("--out", required=True, type=Path,
                       help="HDF5 store to write (moved into place when complete)")
    else:
        p.add_argument("--out", type=Path, default=None, help="also write the results to this new HDF5 store")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue an unfinished store at --out")


def limit_arguments(p: argparse.ArgumentParser, points: str = "points",
                    default: int = DEFAULT_MAX_POINTS) -> None:
    """``--max-points`` and ``--max-memory``: the bounds a run's estimate is checked against before it starts
    (:mod:`landscape.workload`). ``points`` says what a point of this command is."""
    g = p.add_argument_group("bounds (checked before any work)")
    g.add_argument("--max-points", type=positive_int, default=default,
                   help=f"most {points} one run may evaluate (default {default:,})")
    g.add_argument("--max-memory", type=checked(parse_size), default=None,
                   help="most memory the run's estimate may need, e.g. 16G (default: the memory available)")


def work_limits(args: argparse.Namespace) -> WorkLimits:
    return WorkLimits(args.max_points, args.max_memory)


def progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _slurm_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise argparse.ArgumentTypeError(f"--slurm-arg must be KEY=VALUE with an sbatch option name as KEY "
                                         f"(e.g. qos=high, constraint=a100), got {text!r}")
    return key, value


def executor_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--jobs``, ``--detach`` and the Slurm jobs' resources (a sweep fanned out as jobs,
    :mod:`landscape.cluster`)."""
    g = p.add_argument_group("executor (fan the sweep out as jobs, each into its own shard store, merged)")
    g.add_argument("--executor", choices=EXECUTORS, default="none",
                   help="none: this process (default); local: local processes (one GPU each when several "
                        "are visible); slurm: a Slurm job array; debug: the jobs one by one in this process")
    g.add_argument("--jobs", type=positive_int, default=1, help="number of jobs (shards) of the sweep")
    g.add_argument("--detach", action="store_true",
                   help="submit and return; the same command again re-attaches, waits and merges")
    g.add_argument("--slurm-config", type=Path, default=None, metavar="TOML",
                   help="Slurm settings file ([slurm] partition, account, gpus_per_task, cpus_per_task, "
                        "mem_gb, time_min, setup, [slurm.extra]); the flags below override it")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-gpus-per-task", type=positive_int, default=None)
    g.add_argument("--slurm-cpus-per-task", type=positive_int, default=None)
    g.add_argument("--slurm-mem-gb", type=positive_float, default=None)
    g.add_argument("--slurm-time-min", type=positive_int, default=None)
    g.add_argument("--slurm-setup", action="append", default=None, metavar="LINE",
                   help="shell line run before each job, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--slurm-arg", action="append", default=[], type=_slurm_option, metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. qos=high (repeatable)")


def cluster_settings(args: argparse.Namespace,
                     parser: argparse.ArgumentParser | None = None) -> ClusterSettings:
    """The :class:`~landscape.cluster.ClusterSettings` of the executor arguments. A bad combination raises
    :class:`~landscape.cluster.ClusterError` (a ``ValueError``) before any work, or, given the ``parser``,
    ends there as argparse's usage error."""
    if parser is not None:
        try:
            return cluster_settings(args)
        except ValueError as err:
            parser.error(str(err))
    slurm = SlurmSettings.from_toml(args.slurm_config) if args.slurm_config else SlurmSettings()
    slurm = slurm.updated(partition=args.slurm_partition, account=args.slurm_account,
                          gpus_per_task=args.slurm_gpus_per_task, cpus_per_task=args.slurm_cpus_per_task,
                          mem_gb=args.slurm_mem_gb, time_min=args.slurm_time_min,
                          setup=tuple(args.slurm_setup) if args.slurm_setup else None,
                          extra=dict(args.slurm_arg))
    settings = ClusterSettings(args.executor, args.jobs, slurm, args.detach)
    if settings.fans_out and getattr(args, "shard", (0, 1)) != (0, 1):
        raise ValueError("--shard is what each job of --executor runs: give one or the other")
    settings.check_available()
    return settings


EXECUTION_FLAGS = ("executor", "jobs", "detach", "slurm_config", "slurm_partition", "slurm_account",
                   "slurm_gpus_per_task", "slurm_cpus_per_task", "slurm_mem_gb", "slurm_time_min",
                   "slurm_setup", "slurm_arg", "shard", "argv", "func", "no_progress")


def computed_settings(args: argparse.Namespace, *unrecorded: str) -> dict:
    """The arguments that decide what a run computes, for its store's provenance: not how it is executed
    (:data:`EXECUTION_FLAGS`: a shard of a sweep records the same settings as one process) nor ``unrecorded``.
    Paths become strings."""
    drop = set(EXECUTION_FLAGS) | set(unrecorded)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in drop}


def fan_out(args: argparse.Namespace, cluster: ClusterSettings, name: str, store: Path, points: int,
            job_flags: tuple[str, ...] = ("--resume", "--no-progress")) -> list[Path]:
    """Run this command (``args.argv``) as ``--jobs`` jobs of ``--executor``, shard ``i`` of ``n`` into
    ``<store>.shards/<i>-of-<n>.h5``, merged into ``store`` (:func:`landscape.cluster.run_sweep`)."""
    return run_sweep(Sweep.of_store(name, "landscape.cli:main", args.argv, store, points, job_flags), cluster)


# ----------------------------------------------------------------------------------------------- loading
def default_seq_len(info: ModelInfo) -> int:
    """Default segment length of a model: 512 for smollm2-135m, else its context (at most 256)."""
    return 512 if info.name == "smollm2-135m" else min(256, info.context_length or 256)


def heldout(lm: LoadedModel, args: argparse.Namespace, corpus: str | None = None) -> TokenSet:
    """The held-out segments the data arguments ask for (``corpus`` overrides ``--text`` and ``--corpus``)."""
    corpus = corpus or args.text or args.corpus
    return heldout_set(lm.tokenizer, args.seq_len or default_seq_len(lm.info), corpus,
                       args.segments, getattr(args, "stride", None), lm.info.context_length)


def load_with_data(args: argparse.Namespace) -> tuple[LoadedModel, TokenSet]:
    """The model of ``args.model`` and its held-out data."""
    lm = load(args)
    return lm, heldout(lm, args)


def check_eigenvector_settings(eigenvectors: int, lanczos_steps: int | None, segments: int,
                               segments_flag: str) -> None:
    """``--eigenvectors K`` (>= 0), ``--lanczos-steps`` (>= K) and the Hessian's held-out segments (>= 1),
    refused before any work (compare and radius take the same three)."""
    if segments < 1:
        raise ValueError(f"{segments_flag} must be >= 1, got {segments}")
    if eigenvectors < 0:
        raise ValueError(f"--eigenvectors must be >= 0, got {eigenvectors}")
    if lanczos_steps is not None and lanczos_steps < max(eigenvectors, 1):
        raise ValueError(f"--lanczos-steps must be >= --eigenvectors ({eigenvectors}), got {lanczos_steps}")


def check_memory(lm: LoadedModel, args: argparse.Namespace, what: str, points: int, copies: float,
                 advice: str) -> None:
    """Refuse, before any store or result is written, a run whose model plus ``copies`` float32 copies of its
    quantizable weights are above ``--max-memory`` (or the memory available): :func:`held_workload`."""
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    weight_bytes = 4 * sum(weight_matrix(m).numel() for m in quantizable_layers(lm.model).values())
    held_workload(what, points, model_bytes, weight_bytes, copies, advice).check(work_limits(args))


def load(args: argparse.Namespace) -> LoadedModel:
    """The model of ``args.model`` on ``args.device`` in ``args.dtype``."""
    return models.load_model(args.model, args.dtype, args.device)  # through the module: tests count the loads
