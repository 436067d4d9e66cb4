"""What every benchmark shares: results with targets, interleaved timing, peak RSS, models, profiles, machine.

Conventions of every benchmark in ``bench/``:

* **Ratios, not absolute times.** Each figure that has a target is a ratio of two timings (or of two
  memory sizes) measured in the same process, one right after the other, on the same inputs. The CPU
  machines are shared and noisy, so candidates are timed **interleaved** (round 1: A B C, round 2: B C A,
  ...) after one untimed warm-up call each, and every time is the **median** of the rounds
  (:func:`interleaved_medians`).
* **One thread per worker.** Every benchmark process calls :func:`configure_worker` first
  (``torch.set_num_threads(1)``): the cores are shared with other jobs and oversubscribed threads make
  tiny models up to 100x slower. Times therefore measure single-thread work.
* **Targets** (:class:`Target`) are checked by the benchmark and reported in a PASS/MISS column; tests
  never assert on timings.
* **Units**: seconds (``s``), mebibytes (``MiB``), dimensionless ratios (``x``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MIB = 2**20
NO_TARGET = "—"
PROFILE_NAMES = ("quick", "full", "tiny")


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Target:
    """A goal on a measured value: ``value <= limit`` (``at_most``) or ``value >= limit`` (``at_least``)."""

    limit: float
    kind: Literal["at_most", "at_least"]

    def __post_init__(self) -> None:
        if self.kind not in ("at_most", "at_least"):
            raise ValueError(f"Target.kind must be 'at_most' or 'at_least', got {self.kind!r}")
        if not (isinstance(self.limit, (int, float)) and math.isfinite(self.limit)):
            raise ValueError(f"Target.limit must be a finite number, got {self.limit!r}")

    def met(self, value: float) -> bool:
        return value <= self.limit if self.kind == "at_most" else value >= self.limit

    def describe(self, unit: str = "x") -> str:
        return f"{'≤' if self.kind == 'at_most' else '≥'} {self.limit:g}{unit}"

    def shortfall(self, value: float) -> float:
        """How far ``value`` is from the limit as a factor (> 1 when missed; 1 when exactly met)."""
        if value <= 0 or self.limit <= 0:
            return math.inf
        return value / self.limit if self.kind == "at_most" else self.limit / value

    def miss_text(self, value: float, unit: str = "x") -> str:
        """``misses the ≤ 1.2x target by a factor of 1.19`` (for notes on missed targets)."""
        return f"misses the {self.describe(unit)} target by a factor of {self.shortfall(value):.2f}"


@dataclass(frozen=True)
class Row:
    """One reported figure: a value (usually a ratio) of one benchmark on one case, with its target.

    Attributes:
        benchmark: section name (``scan``, ``gptq``, ``hessian``, ``memory``, ``scaling``).
        case: what was measured on (model and sizes), e.g. ``ref-tiny (0.21M params), 4 x 128 tokens``.
        metric: what the value is, e.g. ``naive loop / engine, time per point``.
        value: the measurement, in ``unit``.
        unit: ``x`` for ratios, ``s``, ``MiB``...
        target: the goal, or None for an informational figure.
        detail: the absolute numbers behind a ratio (medians), for the reader.
    """

    benchmark: str
    case: str
    metric: str
    value: float
    unit: str = "x"
    target: Target | None = None
    detail: str = ""

    @property
    def status(self) -> str:
        """``PASS`` / ``MISS`` against the target, ``—`` without one."""
        if self.target is None:
            return NO_TARGET
        return "PASS" if self.target.met(self.value) else "MISS"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = None if self.target is None else {**asdict(self.target),
                                                        "text": self.target.describe(self.unit)}
        d["status"] = self.status
        return d


@dataclass(frozen=True)
class Table:
    """A detail table of a section: column names and rows of already formatted cells."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        bad = [i for i, r in enumerate(self.rows) if len(r) != len(self.columns)]
        if bad:
            raise ValueError(f"table {self.title!r}: rows {bad} do not have {len(self.columns)} cells")


@dataclass(frozen=True)
class Section:
    """The result of one benchmark script.

    Attributes:
        name: ``scan``, ``gptq``... (the script's name).
        title: heading in RESULTS.md.
        rows: the figures with targets (they go into the summary table).
        tables: detail tables.
        notes: measured explanations: why a target is missed, by how much, and what would close it.
        data: raw measurements (every timing sample) for results.json.
        seconds: wall time of the whole benchmark.
    """

    name: str
    title: str
    rows: tuple[Row, ...]
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "rows": [r.to_dict() for r in self.rows],
                "tables": [asdict(t) for t in self.tables], "notes": list(self.notes), "data": self.data,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Section:
        rows = tuple(Row(r["benchmark"], r["case"], r["metric"], r["value"], r["unit"],
                         None if r["target"] is None else Target(r["target"]["limit"], r["target"]["kind"]),
                         r["detail"]) for r in d["rows"])
        tables = tuple(Table(t["title"], tuple(t["columns"]), tuple(tuple(c) for c in t["rows"]))
                       for t in d["tables"])
        return cls(d["name"], d["title"], rows, tables, tuple(d["notes"]), dict(d["data"]),
                   float(d["seconds"]))


# ---------------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """Wall times (seconds) of repeated calls of one candidate; ``median`` is what is reported."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        s = sorted(self.samples)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "samples_s": list(self.samples)}


def interleaved_medians(candidates: Mapping[str, Callable[[], Any]], repeats: int,
                        warmup: int = 1) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    Round ``r`` calls the candidates in the order rotated by ``r`` (A B C, B C A, C A B, ...), so slow
    phases of a noisy machine hit every candidate alike. Returns candidate name -> :class:`Timing`.
    """
    if not candidates:
        raise ValueError("interleaved_medians needs at least one candidate")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            samples[name].append(time.perf_counter() - start)
    return {n: Timing(tuple(s)) for n, s in samples.items()}


def log_log_slope(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(size)``: time grows like ``size**slope``."""
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError(f"need at least two (size, time) pairs of equal length, got {len(sizes)} "
                         f"and {len(times)}")
    x = [math.log(s) for s in sizes]
    y = [math.log(t) for t in times]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        raise ValueError("all sizes are equal: the slope is undefined")
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


# ------------------------------------------------------------------------------------------------ RSS
# the process's resident set and its peak: landscape.memory


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------- models
ARCHITECTURES = ("gpt2", "llama", "pretrained")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a random GPT-2 or Llama built in-process (like ``tests/conftest.py``'s
    ``tiny_model``) or a built-in landscape model loaded with :func:`landscape.models.load_model`
    (``arch="pretrained"``).

    Attributes:
        name: label in the results (for ``pretrained``: the landscape model name, e.g. ``ref-tiny``).
        arch: ``gpt2``, ``llama`` or ``pretrained``.
        hidden, layers, vocab, context: sizes of a random model (ignored for ``pretrained``).
        seed: initialisation seed of a random model.
        heads, kv_heads, intermediate: a random Llama's attention heads, key-value heads and MLP width
            (``0``: twice ``hidden``); a random GPT-2 has ``heads`` heads.
        dtype: the parameters' dtype (``float32``, ``bfloat16``...).
    """

    name: str
    arch: str = "gpt2"
    hidden: int = 32
    layers: int = 2
    vocab: int = 97
    context: int = 128
    seed: int = 0
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelSpec {self.name!r}: arch must be one of {ARCHITECTURES}, "
                             f"got {self.arch!r}")
        if self.arch != "pretrained":
            for what in ("hidden", "layers", "vocab", "context"):
                value = getattr(self, what)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"ModelSpec {self.name!r}: {what} must be a positive "
                                     f"integer, got {value!r}")
            if self.hidden % self.heads or self.heads % self.kv_heads:
                raise ValueError(f"ModelSpec {self.name!r}: hidden ({self.hidden}) must be a multiple of "
                                 f"heads ({self.heads}), and heads of kv_heads ({self.kv_heads})")

    def build(self) -> nn.Module:
        """The model in eval mode with eager attention, in ``dtype``, on the CPU (random ones seeded by
        ``seed``)."""
        from landscape.models import load_model, parse_dtype, prepare_model

        if self.arch == "pretrained":
            return load_model(self.name, dtype=parse_dtype(self.dtype)).model
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(self.seed)
        if self.arch == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=self.vocab, n_positions=self.context,
                                               n_embd=self.hidden, n_layer=self.layers, n_head=self.heads,
                                               bos_token_id=self.vocab - 1, eos_token_id=self.vocab - 1))
        else:
            model = LlamaForCausalLM(LlamaConfig(vocab_size=self.vocab, max_position_embeddings=self.context,
                                                 hidden_size=self.hidden, num_hidden_layers=self.layers,
                                                 num_attention_heads=self.heads,
                                                 num_key_value_heads=self.kv_heads,
                                                 intermediate_size=self.intermediate or 2 * self.hidden))
        return prepare_model(model.to(parse_dtype(self.dtype)))


def vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(name: str, model: nn.Module) -> str:
    """``name (0.21M params)``."""
    return f"{name} ({n_parameters(model) / 1e6:.2g}M params)"


def context_length(model: nn.Module) -> int:
    """Longest sequence the model accepts (``n_positions`` / ``max_position_embeddings`` of its config)."""
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings"))


def random_token_set(model: nn.Module, n_segments: int, seq_len: int, seed: int = 0):
    """A :class:`~landscape.data.TokenSet` of ``n_segments x seq_len`` uniform random ids in ``model``'s
    vocabulary.

    Timings do not depend on token values. Raises ``ValueError`` before anything runs if ``seq_len`` exceeds
    the model's context length.
    """
    from landscape.data import token_set_from_tensor

    if seq_len > context_length(model):
        raise ValueError(f"seq_len={seq_len} exceeds the context length {context_length(model)} of "
                         f"{type(model).__name__}; use at most {context_length(model)} tokens per segment")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size(model), (n_segments, seq_len), generator=generator)
    return token_set_from_tensor(tokens, name=f"random-{seed}", seed=seed)


# ------------------------------------------------------------------------------------------- profiles
def check_profile(name: str) -> str:
    if name not in PROFILE_NAMES:
        raise ValueError(f"unknown benchmark profile {name!r}; accepted: {', '.join(PROFILE_NAMES)}")
    return name


def configure_worker(threads: int = 1) -> None:
    """Set up a benchmark process: ``threads`` torch threads (1: the cores are shared), offline hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notices of random models are not results


def worker_environment() -> dict[str, str]:
    """Environment of a benchmark subprocess: one OpenMP/MKL thread, offline, the repository importable."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))})
    return env


def fmt_seconds(seconds: float) -> str:
    """Seconds with three significant digits in a readable unit (``12.3 ms``, ``1.52 s``)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


# -------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """Where and when the benchmark ran: CPU, cores, memory, load, Python and package versions, commit,
    date."""
    versions = {}
    for package in ("torch", "transformers", "numpy", "h5py", "hessian-eigenthings", "tqdm"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(_meminfo_kib("MemTotal") / 2**20, 1) if _meminfo_kib("MemTotal") else None,
        "load_average_1m_5m_15m": ([round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
                                   else None),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git(["rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        "torch_threads_per_worker": 1,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _git(args: list[str]) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def python_command(module: str, *args: str) -> list[str]:
    """``python -m bench.<module> args`` with this interpreter."""
    return [sys.executable, "-m", f"bench.{module}", *args]


def bench_main(run: Callable[[str], Section], argv: list[str] | None = None) -> int:
    """Command line of every benchmark script: ``--profile tiny|quick|full`` and ``--json PATH``.

    Configures the process as a worker (one torch thread), runs ``run(profile)`` and writes the section as
    JSON to ``PATH`` (standard output without ``--json``).
    """
    parser = argparse.ArgumentParser(description=f"benchmark {run.__module__}")
    parser.add_argument("--profile", default="quick", choices=PROFILE_NAMES)
    parser.add_argument("--json", type=Path, default=None, help="write the section as JSON to this file")
    args = parser.parse_args(argv)
    configure_worker()
    text = json.dumps(run(args.profile).to_dict(), indent=1)
    if args.json is None:
        print(text)
    else:
        args.json.write_text(text)
    return 0
