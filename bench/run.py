"""Run every benchmark and write ``bench/RESULTS.md`` and ``bench/results.json`` (``make bench``).

Each benchmark script (``scan``, ``gptq``, ``qaft``, ``hessian``, ``memory``, ``scaling``) runs in its own
fresh worker process, one after the other, with one torch thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=1``): the machine's cores are shared with other jobs, and several threads per process
would oversubscribe them. A benchmark that fails is reported as failed (with the end of its error output)
and the others still run; the exit status is then 1.

Usage::

    python -m bench.run --quick            # make bench: small models, 2.7 min on 2 busy shared cores
    python -m bench.run --full             # adds SmolLM2-135M (estimated ~45 min on 2 cores; not run yet)
    python -m bench.run --tiny --out /tmp  # smoke run in seconds
    python -m bench.run --only gptq scan   # a subset
    python -m bench.run --rebuild bench/results.json   # re-render from stored measurements, no re-run

Every section is built from its raw measurements alone (``build_section(data)`` in each script), so
``--rebuild`` regenerates RESULTS.md and results.json from a results.json with the current code (wording,
tables, targets) without measuring anything again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    NO_TARGET,
    PROFILE_NAMES,
    Row,
    Section,
    Table,
    check_profile,
    machine_info,
    python_command,
    worker_environment,
)

BENCHMARKS = ("scan", "gptq", "qaft", "hessian", "memory", "scaling")
WORKER_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Failure:
    """A benchmark whose worker process failed: its name and the end of its error output."""

    benchmark: str
    error: str


@dataclass(frozen=True)
class BenchReport:
    """Everything RESULTS.md and results.json say.

    Attributes:
        profile: ``quick``, ``full`` or ``tiny``.
        command: how the run was started.
        machine: :func:`bench.common.machine_info` at the start.
        sections: the benchmarks' results, in run order.
        failures: benchmarks that did not finish.
        seconds: wall time of the whole run.
        load_average_end: 1/5/15-minute load averages when the run ended (the machine is shared).
        rebuilt: the sections were rebuilt from a stored results.json (``--rebuild``), not measured now.
    """

    profile: str
    command: str
    machine: dict[str, Any]
    sections: tuple[Section, ...]
    failures: tuple[Failure, ...] = ()
    seconds: float = 0.0
    load_average_end: tuple[float, ...] = ()
    rebuilt: bool = False

    @property
    def rows(self) -> tuple[Row, ...]:
        return tuple(r for s in self.sections for r in s.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "command": self.command, "machine": self.machine,
                "seconds": self.seconds, "load_average_end": list(self.load_average_end),
                "rebuilt": self.rebuilt, "summary": [r.to_dict() for r in self.rows],
                "sections": [s.to_dict() for s in self.sections],
                "failures": [{"benchmark": f.benchmark, "error": f.error} for f in self.failures]}


# --------------------------------------------------------------------------------------------- running
def run_in_worker(name: str, profile: str) -> Section:
    """Run ``python -m bench.<name> --profile <profile>`` in a fresh process and read its section."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; accepted: {', '.join(BENCHMARKS)}")
    with tempfile.TemporaryDirectory(prefix="landscape-bench-") as tmp:
        out = Path(tmp) / f"{name}.json"
        done = subprocess.run(python_command(name, "--profile", profile, "--json", str(out)),
                              capture_output=True, text=True, env=worker_environment(),
                              timeout=WORKER_TIMEOUT_S, cwd=BENCH_DIR.parent)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"exit status {done.returncode}:\n{done.stderr[-4000:]}")
        return Section.from_dict(json.loads(out.read_text()))


def run_all(profile: str, names: tuple[str, ...] = BENCHMARKS, progress: bool = True,
            command: str = "") -> BenchReport:
    """Every named benchmark of ``profile``, each in its own worker process, as one report."""
    check_profile(profile)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmarks {unknown}; accepted: {', '.join(BENCHMARKS)}")
    from tqdm.auto import tqdm

    machine = machine_info()
    started = time.perf_counter()
    sections, failures = [], []
    with tqdm(names, desc="benchmarks", unit="benchmark", disable=not progress) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            try:
                sections.append(run_in_worker(name, profile))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as err:
                failures.append(Failure(name, str(err)))
    load = tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else ()
    return BenchReport(profile, command or f"python -m bench.run --{profile}", machine,
                       tuple(sections), tuple(failures), time.perf_counter() - started, load)


def rebuild_report(stored: Mapping[str, Any]) -> BenchReport:
    """The report of a stored ``results.json``, every section rebuilt from its raw measurements with the
    current code (``bench.<name>.build_section``); machine, date, command and failures are kept as stored."""
    sections = []
    for s in stored["sections"]:
        if s["name"] not in BENCHMARKS:
            raise ValueError(f"results.json holds an unknown benchmark {s['name']!r}; "
                             f"accepted: {', '.join(BENCHMARKS)}")
        sections.append(importlib.import_module(f"bench.{s['name']}").build_section(s["data"],
                                                                                    float(s["seconds"])))
    return BenchReport(stored["profile"], stored["command"], dict(stored["machine"]), tuple(sections),
                       tuple(Failure(f["benchmark"], f["error"]) for f in stored.get("failures", ())),
                       float(stored["seconds"]), tuple(stored.get("load_average_end", ())), rebuilt=True)


# --------------------------------------------------------------------------------------------- writing
def format_value(row: Row) -> str:
    """A row's value for the table: ratios ``1.23x``, other units after the number, 3 significant digits."""
    if row.unit == "x":
        return f"{row.value:.2f}x"
    return f"{row.value:.3g}{(' ' + row.unit) if row.unit else ''}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: tuple[str, ...], rows: tuple[tuple[str, ...], ...]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def summary_table(rows: tuple[Row, ...]) -> Table:
    """The summary: one line per reported figure, with its target and PASS / MISS / —."""
    return Table("Summary", ("benchmark", "case", "metric", "measured", "target", "status", "detail"),
                 tuple((r.benchmark, r.case, r.metric, format_value(r),
                        r.target.describe(r.unit) if r.target else NO_TARGET, r.status, r.detail)
                       for r in rows))


def render_results(report: BenchReport) -> str:
    """RESULTS.md: machine, versions, date and protocol, the summary table, then each benchmark's details."""
    m = report.machine
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
    load_start = " / ".join(str(x) for x in m.get("load_average_1m_5m_15m") or ()) or "n/a"
    load_end = " / ".join(str(x) for x in report.load_average_end) or "n/a"
    rows = report.rows
    judged = [r for r in rows if r.target is not None]
    passed = sum(r.status == "PASS" for r in judged)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{report.command}` (profile `{report.profile}`) on {m.get('date_utc', 'n/a')} at "
        f"commit `{m.get('git_commit') or 'n/a'}`"
        f"{' with uncommitted changes' if m.get('git_dirty') else ''}; "
        f"the run took {report.seconds / 60:.1f} min."
        + (" Tables and notes were re-rendered from its results.json with `python -m bench.run --rebuild` "
           "(no new measurements)." if report.rebuilt else ""),
        "",
        f"- **Machine**: {m.get('cpu', 'n/a')}, {m.get('logical_cpus', 'n/a')} logical CPUs "
        f"({m.get('usable_cpus', 'n/a')} usable), {m.get('memory_gib', 'n/a')} GiB RAM, "
        f"{m.get('platform', 'n/a')}.",
        f"- **Load average** (1 / 5 / 15 min): {load_start} at the start, {load_end} at the end. The cores "
        f"are shared with other jobs, so absolute times are noisy; compare the ratios.",
        f"- **Software**: Python {m.get('python', 'n/a')}, {versions}.",
        "- **Protocol**: every benchmark runs in a fresh worker process with `torch.set_num_threads(1)` (and "
        "`OMP_NUM_THREADS=1`) to avoid oversubscribing the shared cores: times are single-thread. Each "
        "figure with a target is a ratio of two measurements taken in the same process on the same inputs, "
        "timed interleaved after a warm-up, medians of a few repeats (counts in results.json). Memory is "
        "measured in one fresh process per workload. Targets are checked here (PASS / MISS), never by tests.",
        "",
        "## Summary",
        "",
        *markdown_table(summary_table(rows).columns, summary_table(rows).rows),
        "",
        f"**{passed} of {len(judged)} targets PASS, {len(judged) - passed} MISS**"
        f"{f'; {len(report.failures)} benchmark(s) FAILED' if report.failures else ''}. "
        f"Rows without a target are informational. Why each miss happens and what would close it is under "
        f"its benchmark below.",
    ]
    for section in report.sections:
        lines += ["", f"## {section.title}", "", f"_{section.seconds:.0f} s._"]
        for table in section.tables:
            lines += ["", f"**{table.title}**", "", *markdown_table(table.columns, table.rows)]
        misses = [r for r in section.rows if r.status == "MISS"]
        if section.notes:
            heading = "Misses: by how much, why, and what would close them" if misses else "Notes"
            lines += ["", f"**{heading}**", "", *[f"- {note}" for note in section.notes]]
    if report.failures:
        lines += ["", "## Failed benchmarks", ""]
        for failure in report.failures:
            lines += [f"**{failure.benchmark}**", "", "```", failure.error.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_results(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    """Write ``RESULTS.md`` and ``results.json`` into ``out_dir`` (each written whole, then moved into
    place)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"output directory {out_dir} does not exist")
    paths = (out_dir / "RESULTS.md", out_dir / "results.json")
    for path, text in zip(paths, (render_results(report), json.dumps(report.to_dict(), indent=1) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="landscape benchmarks: write RESULTS.md and results.json")
    size = parser.add_mutually_exclusive_group()
    for name in PROFILE_NAMES:
        size.add_argument(f"--{name}", dest="profile", action="store_const", const=name,
                          help=f"the {name} profile" + (" (default)" if name == "quick" else ""))
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=BENCH_DIR,
                        help="directory for RESULTS.md and results.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--rebuild", type=Path, default=None, metavar="RESULTS_JSON",
                        help="measure nothing: rebuild RESULTS.md and results.json from this results.json")
    args = parser.parse_args(argv)
    profile = args.profile or "quick"
    if not args.out.is_dir():
        parser.error(f"--out {args.out} is not an existing directory")
    if args.rebuild is not None:
        if not args.rebuild.is_file():
            parser.error(f"--rebuild {args.rebuild} is not a file")
        md, js = write_results(rebuild_report(json.loads(args.rebuild.read_text())), args.out)
        print(f"rebuilt {md} and {js} from {args.rebuild}")
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = "python -m bench.run " + " ".join(given) if given else "python -m bench.run"
    report = run_all(profile, tuple(args.only), progress=not args.no_progress, command=command.strip())
    md, js = write_results(report, args.out)
    judged = [r for r in report.rows if r.target is not None]
    print(f"{sum(r.status == 'PASS' for r in judged)}/{len(judged)} targets PASS; wrote {md} and {js} "
          f"in {report.seconds / 60:.1f} min")
    for failure in report.failures:
        print(f"FAILED: {failure.benchmark}: "
              f"{failure.error.strip().splitlines()[-1] if failure.error.strip() else ''}",
              file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
