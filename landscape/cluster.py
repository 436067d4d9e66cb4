"""Fanning a sweep out as jobs: local processes, a Slurm job array, or in-process (debug), through submitit.

A sweep (the points of a scan, the directions of a basin-radius search, the rows of a quantization table)
is embarrassingly parallel, and every entry point can compute shard ``i`` of ``n`` of it into a store of
its own (``--shard i/n``). :func:`run_sweep` is the driver: it starts ``n`` jobs, each running the same
entry point on its shard (the model loaded once per job), shows one progress bar over all of them, and
merges the shards' stores into the final store (:func:`landscape.store.merge_stores`), after checking that
they cover every point.

Where things go, for a final store ``X.h5``:

* shard ``i`` of ``n`` writes ``X.h5.shards/<i>-of-<n>.h5`` (:func:`shard_store_path`), a crash-safe
  store, so a job that dies (killed, out of memory, pre-empted) loses no finished point;
* the sweep's folder (given by the entry point) holds ``jobs.json`` (the jobs submitted, so a driver that was
  stopped re-attaches to jobs still running) and submitit's ``logs/`` (each job's stdout and stderr);
* once merged and verified, the shard stores are removed and ``X.h5`` is in place; the logs stay.

Rerunning the same command continues a sweep: finished shards are kept, a job still running is waited for, and
only the unfinished shards are submitted again (each resumes its own store, so only its missing points are
computed). Every job resumes (``--resume``), which is also what a Slurm requeue after pre-emption runs
(:meth:`ShardJob.checkpoint`).

The merged store equals a single-process run's bit for bit (same seeds, same order of reduction within a
point), except for what describes the execution (:data:`landscape.store.RUN_SPECIFIC_KEYS` of the provenance)
and wall times. One caveat: torch's CPU reductions depend on its thread count, so compare with a single
process that used as many threads as each job (the jobs keep torch's default).

submitit is an optional dependency (``pip install 'landscape[cluster]'``); ``debug`` needs none.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from landscape.store import merge_stores, partial_path
from landscape.store.files import DONE, PROGRESS_ENV, progress_path

EXECUTORS = ("none", "local", "slurm", "debug")
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit's local jobs time out (default 2 min): a month is "never"
SLURM_KEYS = ("partition", "gpus_per_task", "cpus_per_task", "mem_gb", "time_min", "account", "setup")


class ClusterError(ValueError):
    """Executor settings that cannot run (an unknown executor, a bad Slurm setting, submitit missing)."""


class SweepError(RuntimeError):
    """Jobs of a sweep failed, or its shards do not cover its points: the finished points are kept."""


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SlurmSettings:
    """What a Slurm job of a sweep asks for (sbatch's options; ``None`` leaves the cluster's default).

    Attributes:
        partition, account: ``--partition``, ``--account``.
        gpus_per_task, cpus_per_task: ``--gpus-per-task``, ``--cpus-per-task``.
        mem_gb: ``--mem`` in GB.
        time_min: ``--time`` in minutes (default 4 h); submitit requeues a job that reaches it.
        setup: shell lines run before the job (``module load ...``, activating an environment).
        extra: any other sbatch option, ``KEY -> VALUE`` (``#SBATCH --KEY=VALUE``).
    """

    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 240
    account: str | None = None
    setup: tuple[str, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gpus_per_task", "cpus_per_task", "time_min"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ClusterError(f"slurm {name} must be an integer >= 1, got {value!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0):
            raise ClusterError(f"slurm mem_gb must be a number > 0, got {self.mem_gb!r}")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ClusterError(f"slurm {name} must be a non-empty string, got {value!r}")
        if isinstance(self.setup, str) or not all(isinstance(s, str) for s in self.setup):
            raise ClusterError(f"slurm setup must be a list of shell lines, got {self.setup!r}")
        object.__setattr__(self, "setup", tuple(self.setup))
        extra = dict(self.extra)
        for key, value in extra.items():
            if not isinstance(key, str) or not key or key.startswith("-") or "=" in key or " " in key:
                raise ClusterError(f"a Slurm option must be KEY=VALUE with KEY like 'qos' or 'constraint' "
                                   f"(no dashes, spaces or '='), got key {key!r}")
        object.__setattr__(self, "extra", {k: str(v) for k, v in sorted(extra.items())})

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SlurmSettings:
        """Settings from a TOML file: the keys of this class at the top level or under ``[slurm]``; other
        sbatch options under ``[slurm.extra]``."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no Slurm settings file at {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ClusterError(f"{path} is not a TOML file: {err}") from None
        data = data.get("slurm", data)
        unknown = sorted(set(data) - set(SLURM_KEYS) - {"extra"})
        if unknown:
            raise ClusterError(f"{path}: unknown Slurm settings {unknown}; accepted: "
                               f"{', '.join(SLURM_KEYS)} and an [slurm.extra] table of sbatch options")
        return cls(**data)

    def updated(self, **changes: Any) -> SlurmSettings:
        """These settings with the given non-``None`` values replaced; ``extra`` entries are added."""
        extra = {**self.extra, **(changes.pop("extra", None) or {})}
        return replace(self, extra=extra, **{k: v for k, v in changes.items() if v is not None})

    def parameters(self, job_name: str) -> dict[str, Any]:
        """The parameters of submitit's ``SlurmExecutor.update_parameters`` (sbatch's names)."""
        out: dict[str, Any] = {"job_name": job_name, "time": self.time_min, "signal_delay_s": 120}
        for name, key in (("partition", "partition"), ("account", "account"),
                          ("gpus_per_task", "gpus_per_task"), ("cpus_per_task", "cpus_per_task")):
            if getattr(self, name) is not None:
                out[key] = getattr(self, name)
        if self.mem_gb is not None:
            out["mem"] = f"{int(round(self.mem_gb * 1024))}MB"
        if self.setup:
            out["setup"] = list(self.setup)
        if self.extra:
            out["additional_parameters"] = dict(self.extra)
        return out


@dataclass(frozen=True)
class ClusterSettings:
    """How a sweep runs: in this process (``none``), or as ``jobs`` jobs of an executor.

    Attributes:
        executor: ``none`` (this process, the default), ``local`` (local processes; one GPU each when several
            are visible), ``slurm`` (a Slurm job array), ``debug`` (the jobs one after another in this
            process, through the same shards and merge: for tests and debugging).
        jobs: number of jobs (shards); 1 with ``none``.
        slurm: the Slurm jobs' resources.
        detach: submit and return without waiting (re-attach by running the same command again).
        poll_seconds: how often the driver looks at its jobs.
    """

    executor: str = "none"
    jobs: int = 1
    slurm: SlurmSettings = SlurmSettings()
    detach: bool = False
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ClusterError(f"unknown executor {self.executor!r}; accepted: {', '.join(EXECUTORS)}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ClusterError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        if self.executor == "none" and self.jobs != 1:
            raise ClusterError(f"--jobs {self.jobs} needs an executor (--executor local, slurm or debug)")
        if self.detach and self.executor in ("none", "debug"):
            raise ClusterError(f"--detach needs jobs that outlive this process (local or slurm), not "
                               f"{self.executor!r}")

    @property
    def fans_out(self) -> bool:
        return self.executor != "none"

    def check_available(self) -> None:
        """Raise unless this machine can run the executor: submitit for ``local`` / ``slurm``."""
        if self.executor in ("local", "slurm"):
            try:
                import submitit  # noqa: F401
            except ImportError:
                raise ClusterError(f"--executor {self.executor} needs submitit: "
                                   f"pip install 'landscape[cluster]'") from None


# ---------------------------------------------------------------------------------------------- a sweep
@dataclass(frozen=True)
class Sweep:
    """One fanned-out run of an entry point.

    Attributes:
        name: what it is (job names, messages), e.g. ``"scan"``.
        entry: ``"module:function"``, called in each job as ``function(argv)`` (an exit status, 0 = success).
        argv: the command's own arguments (the executor's flags may stay: every job's arguments end with
            ``--executor none``).
        shard_arguments: ``(i, n) -> arguments`` appended to ``argv`` for shard ``i`` of ``n`` (e.g.
            ``--shard i/n --out <shard store>``).
        stores: the final stores and the number of points each holds (for the progress bar).
        folder: where the jobs' logs and ``jobs.json`` go.
        job_flags: flags every job adds: it resumes its shard's store (after a failure or a requeue) and
            shows no progress bar of its own.
    """

    name: str
    entry: str
    argv: tuple[str, ...]
    shard_arguments: Callable[[int, int], Sequence[str]]
    stores: Mapping[Path, int]
    folder: Path
    job_flags: tuple[str, ...] = ("--resume", "--no-progress")

    @classmethod
    def of_store(cls, name: str, entry: str, argv: Sequence[str], store: str | os.PathLike, points: int,
                 job_flags: tuple[str, ...] = ("--resume", "--no-progress")) -> Sweep:
        """The sweep of an entry point that writes one store at ``--out``: job ``i`` of ``n`` runs it with
        ``--shard i/n --out <store>.shards/<i>-of-<n>.h5``; its folder is ``<store>.shards``."""
        store = Path(store)

        def shard_arguments(i: int, n: int) -> list[str]:
            return ["--shard", f"{i}/{n}", "--out", str(shard_store_path(store, i, n))]

        return cls(name, entry, tuple(argv), shard_arguments, {store: points}, shard_folder(store), job_flags)

    def job(self, index: int, count: int) -> ShardJob:
        own = (a for a in self.argv if a != "--detach")  # the driver's flag, not the job's
        argv = (*own, *self.shard_arguments(index, count), "--executor", "none", "--jobs", "1",
                *self.job_flags)
        return ShardJob(self.entry, argv)


def shard_report(path: str | os.PathLike, done: np.ndarray, shard: tuple[int, int],
                 unit: str = "points") -> str:
    """What a job prints when its shard is stored."""
    return f"{path}: {int(done.sum())} of {done.size} {unit} done (shard {shard[0]}/{shard[1]})"


def shard_folder(store: str | os.PathLike) -> Path:
    """The folder beside the final store ``store`` that holds its shards: ``<store>.shards``."""
    store = Path(store)
    return store.with_name(store.name + ".shards")


def shard_store_path(store: str | os.PathLike, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` of the final store ``store`` is written:
    ``<store>.shards/<index>-of-<count>.h5``."""
    return shard_folder(store) / f"{index}-of-{count}.h5"


@dataclass(frozen=True)
class ShardJob:
    """What one job runs: the entry point on its shard's arguments. Pickled by submitit (by reference to this
    module, so every job imports the installed landscape)."""

    entry: str
    argv: tuple[str, ...]

    def __call__(self) -> int:
        module, _, function = self.entry.partition(":")
        tail = _Tail(sys.stderr)
        before = os.environ.get(PROGRESS_ENV)
        os.environ[PROGRESS_ENV] = "1"  # the store writer reports finished points beside each shard
        try:
            with contextlib.redirect_stderr(tail):  # still written to the log, its end kept for the driver
                status = getattr(importlib.import_module(module), function)(list(self.argv))
        finally:  # a debug job runs in the driver's process: leave its environment as it was
            if before is None:
                os.environ.pop(PROGRESS_ENV, None)
            else:
                os.environ[PROGRESS_ENV] = before
        if status not in (0, None):
            raise SweepError(f"exit status {status}: {tail.last_line()}")
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any):
        """On pre-emption or time-out, Slurm requeues the same job: it resumes its shard's store."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class _Tail(io.TextIOBase):
    """A text stream that writes through and keeps the last few lines (a job's error message)."""

    def __init__(self, stream: Any, keep: int = 4096):
        self.stream, self.keep, self.text = stream, keep, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.text = (self.text + text)[-self.keep:]
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def last_line(self) -> str:
        lines = [line for line in self.text.replace("\r", "\n").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or ["(nothing on stderr)"])[-1]


# ------------------------------------------------------------------------------------------- the driver
def run_sweep(sweep: Sweep, settings: ClusterSettings) -> list[Path]:
    """Run ``sweep`` as ``settings.jobs`` jobs, wait for them with one progress bar, merge and verify.

    Returns the final stores (all finished). With ``settings.detach``, returns ``[]`` once the jobs are
    submitted.

    Raises:
        ClusterError: before anything is submitted (executor unavailable, the sweep's folder made for another
            number of jobs).
        SweepError: jobs failed (each named with its error and log), or the shards miss points; every finished
            point is kept in the shard stores and rerunning the same command computes only what is missing.
    """
    settings.check_available()
    if all(store.exists() for store in sweep.stores):  # merged by an earlier run
        return list(sweep.stores)
    n = settings.jobs
    state = _SweepState.open(sweep, settings)
    finished = [i for i in range(n) if _shard_finished(sweep, i, n)]
    todo = [i for i in range(n) if i not in finished]
    handles = {i: h for i in todo if (h := state.attach(i)) is not None}  # jobs of a previous driver
    submit = [i for i in todo if i not in handles]
    print(f"[landscape] {sweep.name}: {n} jobs ({settings.executor}): {len(finished)} finished, "
          f"{len(handles)} running, {len(submit)} to submit; logs in {state.logs}", file=sys.stderr)
    handles |= _submit(sweep, settings, state, submit)
    state.save()
    if settings.detach:
        print("[landscape] detached: run the same command again to re-attach, wait and merge",
              file=sys.stderr)
        return []
    try:
        failures = _wait(sweep, settings, handles)
    except KeyboardInterrupt:
        running = "" if settings.executor == "debug" else "; the submitted jobs keep running"
        raise SweepError(f"interrupted{running}: run the same command again to re-attach, wait for what is "
                         f"missing and merge") from None
    if failures:
        lines = "\n".join(f"  job {i} (shard {i}/{n}): {err}\n    log: {log}" for i, (err, log) in
                          sorted(failures.items()))
        raise SweepError(f"{len(failures)} of {n} jobs of {sweep.name} failed; the finished points are kept "
                         f"in the shard stores (*.shards/): rerun the same command to compute only what is "
                         f"missing.\n{lines}")
    merged = [_merge(store, n) for store in sweep.stores]
    state.finish()
    return merged


class _Handle:
    """A job being waited for: submitted now (a submitit job), re-attached (a pid or a Slurm job id), or run
    in this process (debug)."""

    def __init__(self, job: Any = None, run: ShardJob | None = None, pid: int | None = None,
                 log: str = ""):
        self.job, self.run, self.pid, self.log = job, run, pid, log
        self._error: str | None = None
        self._done = False

    def poll(self) -> bool:
        """Whether the job has ended (a debug job runs here, to its end)."""
        if self._done:
            return True
        if self.run is not None:
            try:
                self.run()
            except Exception as err:  # noqa: BLE001 - the job's failure is reported, the others go on
                self._error = f"{type(err).__name__}: {err}"
            self._done = True
        elif self.pid is not None:  # a job of an earlier driver: only its process is known
            self._done = not _alive(self.pid)
        elif self.job.done():
            err = self.job.exception()
            self._error = None if err is None else _job_error(str(err))
            self._done = True
        return self._done

    @property
    def error(self) -> str | None:
        return self._error

    def unfinished(self) -> str:
        """Why a job that ended left its shard unfinished: the exception in its log, if any."""
        try:
            text = Path(self.log).read_text(errors="replace")
        except OSError:
            text = ""
        found = _job_error(text) if re.search(r"^[\w.]+(Error|Exception)\b", text, re.M) else ""
        return found or "the job ended without finishing its shard"


def _submit(sweep: Sweep, settings: ClusterSettings, state: _SweepState,
            indices: Sequence[int]) -> dict[int, _Handle]:
    n = settings.jobs
    if not indices:
        return {}
    if settings.executor == "debug":
        return {i: _Handle(run=sweep.job(i, n), log="(in this process)") for i in indices}
    import submitit

    handles = {}
    if settings.executor == "slurm":
        executor = submitit.SlurmExecutor(folder=state.logs)
        executor.update_parameters(**settings.slurm.parameters(f"landscape-{sweep.name}"))
        with executor.batch():
            jobs = {i: executor.submit(sweep.job(i, n)) for i in indices}
    else:
        jobs = {}
        gpus = _visible_gpus()
        for i in indices:
            executor = submitit.LocalExecutor(folder=state.logs)
            one_gpu = {"gpus_per_node": 1, "visible_gpus": (gpus[i % len(gpus)],)} if gpus else {}
            executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, **one_gpu)
            jobs[i] = executor.submit(sweep.job(i, n))
    for i, job in jobs.items():
        handles[i] = _Handle(job=job, log=str(job.paths.stderr))
        state.record(i, job.job_id, str(job.paths.stderr))
    return handles


def _wait(sweep: Sweep, settings: ClusterSettings,
          handles: Mapping[int, _Handle]) -> dict[int, tuple[str, str]]:
    """Wait for every job, with one bar over all points; returns the failed jobs' (error, log)."""
    n = settings.jobs
    total = sum(sweep.stores.values())
    failures: dict[int, tuple[str, str]] = {}
    pending = dict(handles)
    finished: dict[Path, int] = {}  # finished shard stores' point counts
    with tqdm(total=total, desc=f"{sweep.name} ({n} jobs)", unit="point", leave=False) as bar:
        while True:
            for i, handle in list(pending.items()):
                if handle.poll():
                    del pending[i]
                    if handle.error is not None:
                        failures[i] = (handle.error, handle.log)
                    elif not _shard_finished(sweep, i, n):
                        failures[i] = (handle.unfinished(), handle.log)
            bar.n = min(total, _points_done(sweep, n, finished))
            bar.refresh()
            if not pending:
                return failures
            time.sleep(settings.poll_seconds)


def _merge(store: Path, n: int) -> Path:
    """Merge the shard stores of ``store`` after checking they cover every point; verify the merged store;
    then remove the shard stores."""
    shards = [shard_store_path(store, i, n) for i in range(n)]
    covered = np.logical_or.reduce([_done_mask(p) for p in shards])
    if not covered.all():
        missing = np.flatnonzero(~covered.ravel())
        raise SweepError(f"the shards of {store} miss {missing.size} of {covered.size} points (flat indices "
                         f"{missing[:10].tolist()}...): rerun the same command")
    if store.exists():  # a previous driver merged it and stopped before cleaning up
        merged = store
    else:
        merged = merge_stores(store, shards)
    check = _done_mask(merged)  # read back from disk
    if not check.all() or check.shape != covered.shape:
        raise SweepError(f"{merged} does not hold every point after the merge; the shards are kept in "
                         f"{shards[0].parent}")
    for p in shards:
        p.unlink()
    if not any(shards[0].parent.iterdir()):
        shards[0].parent.rmdir()
    return merged


def _shard_finished(sweep: Sweep, index: int, count: int) -> bool:
    """Whether shard ``index`` wrote every store (or the final stores were merged already)."""
    return all(store.exists() or shard_store_path(store, index, count).exists() for store in sweep.stores)


def _done_mask(path: Path) -> np.ndarray:
    """The ``done`` mask of a finished store, without reading its arrays."""
    try:
        with h5py.File(path, "r") as f:
            return f[DONE][()]
    except OSError as err:
        raise SweepError(f"{path} cannot be read ({err}): rerun the same command") from None


def _points_done(sweep: Sweep, count: int, finished: dict[Path, int]) -> int:
    """Finished points over every store and shard: finished shard stores are counted once (``finished``
    keeps their counts between polls), running ones report through the progress file beside their partial
    store."""
    done = 0
    for store, points in sweep.stores.items():
        if store.exists():
            done += points
            continue
        for i in range(count):
            shard = shard_store_path(store, i, count)
            if shard not in finished and shard.exists():
                with contextlib.suppress(SweepError):  # unreadable for now: counted at a later poll
                    finished[shard] = int(np.count_nonzero(_done_mask(shard)))
            if shard in finished:
                done += finished[shard]
                continue
            with contextlib.suppress(OSError, ValueError, KeyError):
                done += int(json.loads(progress_path(partial_path(shard)).read_text())["done"])
    return done


def _visible_gpus() -> list[int]:
    """Indices of the CUDA devices this process sees (none without torch's CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended: reaped here if it is our child)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _job_error(text: str) -> str:
    """The exception line of a failed job's traceback (submitit's message wraps it in the whole trace)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line)]
    if raised:
        return re.sub(r"^[\w.]*SweepError: ", "", raised[-1])
    return " | ".join(lines[-3:]) if lines else "(no message)"


# -------------------------------------------------------------------------------------- the sweep's state
class _SweepState:
    """``jobs.json`` in the sweep's folder: the number of jobs, the executor, and each submitted job's id and
    log, so a driver started again re-attaches to its jobs."""

    def __init__(self, folder: Path, data: dict[str, Any], previous_executor: str | None = None):
        self.folder, self.data = folder, data
        self.logs = folder / "logs"
        self.previous_executor = previous_executor  # whose jobs ``jobs.json`` lists

    @classmethod
    def open(cls, sweep: Sweep, settings: ClusterSettings) -> _SweepState:
        path = sweep.folder / "jobs.json"
        fresh = {"sweep": sweep.name, "jobs": settings.jobs, "executor": settings.executor, "submitted": {}}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = fresh
            if data.get("jobs") != settings.jobs:
                raise ClusterError(f"{sweep.folder} holds a sweep started with {data.get('jobs')} jobs: "
                                   f"rerun it with --jobs {data.get('jobs')}, or remove that folder and the "
                                   f"shard stores (*.shards) to start over with {settings.jobs}")
            previous, data["executor"] = data.get("executor"), settings.executor
            return cls(sweep.folder, data, previous)
        sweep.folder.mkdir(parents=True, exist_ok=True)
        return cls(sweep.folder, fresh)

    def attach(self, index: int) -> _Handle | None:
        """A handle on shard ``index``'s job if a previous driver submitted it and it still runs."""
        job = self.data["submitted"].get(str(index))
        if not job or self.previous_executor != self.data["executor"]:
            return None
        if self.data["executor"] == "local":
            pid = int(job["job_id"])
            return _Handle(pid=pid, log=job["log"]) if _alive(pid) and _is_submitit(pid) else None
        if self.data["executor"] == "slurm":
            import submitit

            slurm_job = submitit.SlurmJob(folder=self.logs, job_id=job["job_id"])
            if slurm_job.state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
                return _Handle(job=slurm_job, log=job["log"])
        return None

    def record(self, index: int, job_id: str, log: str) -> None:
        self.data["submitted"][str(index)] = {"job_id": str(job_id), "log": log}

    def save(self) -> None:
        tmp = self.folder / "jobs.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.folder / "jobs.json")

    def finish(self) -> None:
        """The sweep is merged: forget its jobs (their logs stay)."""
        (self.folder / "jobs.json").unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _is_submitit(pid: int) -> bool:
    try:
        return b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid
