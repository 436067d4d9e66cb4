"""Sweeps fanned out as jobs (landscape.cluster): local processes and in-process debug jobs give the same
stores as one process, bit for bit; a killed job loses no finished point and a rerun computes only what is
missing; a failing job names its log and leaves the other shards alone; a Slurm submission is checked without
Slurm."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_same_store

from landscape.cli import main
from landscape.cluster import (
    ClusterError,
    ClusterSettings,
    SlurmSettings,
    Sweep,
    run_sweep,
    shard_store_path,
)
from landscape.store import partial_path, read_store
from landscape.store.files import PROGRESS_ENV, progress_path

pytest.importorskip("submitit")

TINY = ["ref-tiny", "--seq-len", "32", "--segments", "2", "--no-progress"]
RADIUS = ["radius", *TINY, "--directions", "5", "--tolerance", "0.05", "--profile", "0:0.5:3"]
SCAN = ["scan", *TINY, "--kind", "filter", "--grid", "-1:1:30", "--grid2", "-1:1:20", "--orthogonalize"]


@pytest.fixture(autouse=True)
def _jobs_like_the_tests(monkeypatch):
    """Jobs are new processes: give them the tests' one thread (torch's reductions depend on the thread count)
    and the repository on their path (the study scripts' jobs import ``analyses``)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def run(argv, capsys=None) -> int:
    status = main(argv)
    if capsys is not None:
        capsys.readouterr()
    return status


def test_radius_search_over_local_and_debug_jobs_equals_one_process(tmp_path, capsys):
    assert run([*RADIUS, "--out", str(tmp_path / "one.h5")]) == 0
    assert run([*RADIUS, "--out", str(tmp_path / "debug.h5"), "--executor", "debug", "--jobs", "3"]) == 0
    assert PROGRESS_ENV not in os.environ  # the in-process jobs left the driver's environment as it was
    assert run([*RADIUS, "--out", str(tmp_path / "local.h5"), "--executor", "local", "--jobs", "2"]) == 0
    assert "R(w0) median" in capsys.readouterr().out
    for name in ("debug.h5", "local.h5"):
        assert_same_store(tmp_path / name, tmp_path / "one.h5")
        provenance = read_store(tmp_path / name).provenance
        assert [m["shard"]["count"] for m in provenance["merged_from"]] in ([3, 3, 3], [2, 2])
    # the shard stores are gone once merged; the local jobs' logs stay
    assert not list(tmp_path.glob("*.shards/*.h5")) and list(tmp_path.glob("local.h5.shards/logs/*.err"))
    assert not (tmp_path / "debug.h5.shards").exists()


def test_a_killed_local_job_loses_nothing_and_the_rerun_computes_only_what_is_missing(tmp_path, capsys):
    """SIGKILL one job of a 2-D scan after its first points, run the same command again: the finished shard
    is not resubmitted, the killed one resumes its store, and the merge equals one uninterrupted process (as
    debug jobs' does)."""
    assert run([*SCAN, "--out", str(tmp_path / "one.h5")], capsys) == 0
    out = tmp_path / "scan.h5"
    argv = [*SCAN, "--out", str(out), "--executor", "local", "--jobs", "2"]
    status = {}
    driver = threading.Thread(target=lambda: status.setdefault("first", main(argv)))
    driver.start()
    progress = progress_path(partial_path(shard_store_path(out, 1, 2)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the progress file appears once the job's store is open
        try:
            report = json.loads(progress.read_text())
        except (OSError, ValueError):
            report = {"done": 0}
        if report["done"] >= 1:
            break
        time.sleep(0.05)
    os.kill(report["pid"], signal.SIGKILL)
    driver.join(timeout=180)
    assert status["first"] == 2  # the driver reports the failed job and keeps the rest
    err = capsys.readouterr().err
    assert "1 of 2 jobs of scan failed" in err and "log:" in err and "rerun the same command" in err
    killed = read_store(partial_path(shard_store_path(out, 1, 2)))
    assert 1 <= killed.done.sum() < 300  # of its 300 points (1, 3, 5, ... of the 600)
    finished = shard_store_path(out, 0, 2)
    assert read_store(finished).done.sum() == 300
    before = finished.stat().st_mtime_ns

    assert main(argv) == 0
    assert "1 finished, 0 running, 1 to submit" in capsys.readouterr().err
    assert_same_store(out, tmp_path / "one.h5")
    debug = tmp_path / "debug.h5"
    assert main([*SCAN, "--out", str(debug), "--executor", "debug", "--jobs", "3"]) == 0
    assert_same_store(debug, tmp_path / "one.h5")
    assert not finished.exists() and before  # merged, then removed: never rewritten before the merge


def test_a_failing_job_names_its_log_and_leaves_the_other_shards_intact(tmp_path, capsys):
    out = tmp_path / "r.h5"
    bad = partial_path(shard_store_path(out, 1, 2))
    bad.parent.mkdir()
    bad.write_bytes(b"not an HDF5 store")  # bad input: job 1 cannot resume its store
    argv = [*RADIUS, "--out", str(out), "--executor", "local", "--jobs", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 of 2 jobs of radius failed" in err and "job 1 (shard 1/2)" in err
    said = f"error: {bad} is left from a run that stopped while writing and cannot be read back"
    assert said in err and "delete it" in err  # the job's own message, and its log
    log = Path(err.split("log: ")[1].split()[0])
    assert said in log.read_text()
    assert read_store(shard_store_path(out, 0, 2)).done.sum() == 3 and not out.exists()
    bad.unlink()
    assert main(argv) == 0 and read_store(out).done.all()


def test_quant_table_over_local_and_debug_jobs_equals_one_process(tmp_path):
    from analyses import quant_table

    args = ["--model", "ref-tiny", "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-segments", "4",
            "--layer-mse-sequences", "2", "--core-formats", "int4", "--only", "core-int4", "wide",
            "--group-size", "32", "--core-methods", "rtn", "gptq", "gptq+lorc", "qaft", "fp-finetune",
            "--no-progress"]
    quant_table.main([*args, "--out", str(tmp_path / "one")])
    quant_table.main([*args, "--out", str(tmp_path / "jobs"), "--executor", "local", "--jobs", "2"])
    quant_table.main([*args, "--out", str(tmp_path / "debug"), "--executor", "debug", "--jobs", "3"])
    for name in ("core-int4.h5", "wide.h5"):
        for run_dir in ("jobs", "debug"):
            assert_same_store(tmp_path / run_dir / name, tmp_path / "one" / name)
    # every saved result computed once, by the job that owns its group (GPTQ int4 with LoRC and W4A8)
    assert sorted(p.name for p in (tmp_path / "jobs" / "results").rglob("*.json")) == \
        sorted(p.name for p in (tmp_path / "one" / "results").rglob("*.json"))


def test_a_sweep_started_with_other_jobs_is_refused_before_anything_runs(tmp_path):
    store = tmp_path / "x.h5"
    sweep = Sweep("x", "landscape.cli:main", ("scan",), lambda i, n: [], {store: 4}, tmp_path / "x.h5.shards")
    (tmp_path / "x.h5.shards").mkdir()
    (tmp_path / "x.h5.shards" / "jobs.json").write_text(json.dumps({"jobs": 4, "submitted": {}}))
    with pytest.raises(ClusterError, match="started with 4 jobs: rerun it with --jobs 4"):
        run_sweep(sweep, ClusterSettings("debug", 2))


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "4"], "--jobs 4 needs an executor"),
    (["--executor", "debug", "--jobs", "2", "--shard", "0/2"], "--shard is what each job"),
    (["--executor", "debug", "--detach"], "--detach needs jobs that outlive"),
])
def test_bad_executor_settings_are_refused_before_the_model_loads(argv, message, tmp_path, capsys,
                                                                   monkeypatch):
    import landscape.models

    monkeypatch.setattr(landscape.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main([*RADIUS, "--out", str(tmp_path / "r.h5"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bad_slurm_settings_name_the_value(tmp_path):
    with pytest.raises(SystemExit):
        main([*RADIUS, "--out", str(tmp_path / "r.h5"), "--slurm-arg", "qos"])
    with pytest.raises(ClusterError, match="gpus_per_task must be an integer >= 1, got 0"):
        SlurmSettings(gpus_per_task=0)
    config = tmp_path / "slurm.toml"
    config.write_text('[slurm]\npartition = "gpu"\ngpu = 1\n')
    with pytest.raises(ClusterError, match=r"unknown Slurm settings \['gpu'\]"):
        SlurmSettings.from_toml(config)


EXPECTED_SBATCH = """#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --array=0-1%2
#SBATCH --cpus-per-task=8
#SBATCH --error={logs}/%A_%a_0_log.err
#SBATCH --gpus-per-task=1
#SBATCH --job-name=landscape-radius
#SBATCH --mem=65536MB
#SBATCH --nodes=1
#SBATCH --open-mode=append
#SBATCH --output={logs}/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@120
#SBATCH --time=90
#SBATCH --wckey=submitit

# setup
module load cuda/12.4

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {logs}/%A_%a_%t_log.out --error {logs}/%A_%a_%t_log.err {python} -u -m \
submitit.core._submit {logs}
"""


def test_a_slurm_job_array_is_submitted_with_the_settings_of_the_flags_and_the_file(tmp_path, monkeypatch,
                                                                                 capsys):
    """No Slurm here: a fake ``sbatch`` keeps the script it is given; the driver detaches after submitting."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kept = tmp_path / "submitted.sh"
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {kept}; echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "slurm.toml"
    config.write_text('[slurm]\npartition = "gpu"\naccount = "proj"\ntime_min = 30\nmem_gb = 64\n'
                      'setup = ["module load cuda/12.4"]\n[slurm.extra]\nqos = "high"\n')
    out = tmp_path / "r.h5"
    assert main([*RADIUS, "--out", str(out), "--executor", "slurm", "--jobs", "2", "--detach",
                 "--slurm-config", str(config), "--slurm-time-min", "90", "--slurm-gpus-per-task", "1",
                 "--slurm-cpus-per-task", "8"]) == 0
    assert "detached" in capsys.readouterr().err
    logs = out.with_name("r.h5.shards") / "logs"
    assert kept.read_text() == EXPECTED_SBATCH.format(logs=logs, python=sys.executable)
    state = json.loads((logs.parent / "jobs.json").read_text())
    assert state["jobs"] == 2 and state["executor"] == "slurm"
    assert {k: v["job_id"] for k, v in state["submitted"].items()} == {"0": "4242_0", "1": "4242_1"}


def test_jobs_that_start_together_build_a_cache_entry_once(tmp_path):
    """The jobs of a sweep on an empty cache: the first builds the entry under the lock, the others wait and
    use it (before the lock, two jobs trained ref-tiny twice and their stores disagreed on its provenance)."""
    from landscape.cache import building

    target, builds = tmp_path / "entry", []

    def build():
        with building(target):
            if not target.exists():
                builds.append(threading.get_ident())
                time.sleep(0.2)  # long enough for the others to be waiting on the lock
                target.write_text("built")

    workers = [threading.Thread(target=build) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(builds) == 1 and target.read_text() == "built"


def test_spectrum_tasks_over_debug_jobs_equal_one_process(tmp_path, capsys):
    """Each job runs some of the tasks (spectrum, trace, density) into its shard; the merge holds them all."""
    spectrum = ["spectrum", "ref-tiny", "--seq-len", "16", "--segments", "2", "--k", "2", "--k-bottom", "1",
                "--lanczos-steps", "10", "--trace-matvecs", "6", "--density-runs", "1",
                "--density-steps", "5", "--layers", "transformer.h.0.*", "--no-progress"]
    with pytest.warns(Warning):  # 10 Lanczos steps do not converge
        assert run([*spectrum, "--out", str(tmp_path / "one.h5")]) == 0
        assert run([*spectrum, "--out", str(tmp_path / "jobs.h5"), "--executor", "debug", "--jobs", "2"]) == 0
    assert "| top |" in capsys.readouterr().out
    assert_same_store(tmp_path / "jobs.h5", tmp_path / "one.h5")


def test_a_detached_sweep_is_re_attached_by_the_same_command(tmp_path, capsys):
    """Submit and return; the same command again finds the jobs still running, waits for them (nothing is
    submitted twice) and merges; the store equals one process's."""
    assert run([*RADIUS, "--out", str(tmp_path / "one.h5")], capsys) == 0
    argv = [*RADIUS, "--out", str(tmp_path / "r.h5"), "--executor", "local", "--jobs", "2"]
    assert main([*argv, "--detach"]) == 0
    assert "detached" in capsys.readouterr().err and not (tmp_path / "r.h5").exists()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "0 to submit" in err and ("2 running" in err or "1 running" in err), err
    assert_same_store(tmp_path / "r.h5", tmp_path / "one.h5")
    assert len(list((tmp_path / "r.h5.shards" / "logs").glob("*_submitted.pkl"))) == 2


def test_the_figure_pipeline_runs_its_sweep_steps_as_jobs_with_the_same_stores(tmp_path, capsys):
    """make figures --executor: the quantization tables and the radius search run as jobs (debug: in this
    process), every store equals the single-process run's, and the pages are written."""
    from analyses import run_all

    args = ["--tiny", "--no-png", "--no-progress"]
    assert run_all.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert run_all.main([*args, "--out", str(tmp_path / "jobs"), "--executor", "debug", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("2 jobs (debug)") == 4  # three quantization tables and the radius search
    one, jobs = tmp_path / "one" / "data", tmp_path / "jobs" / "data"
    stores = sorted(one.rglob("*.h5"))
    assert len(stores) >= 10 and sorted(p.relative_to(one) for p in stores) == sorted(
        p.relative_to(jobs) for p in jobs.rglob("*.h5"))
    for store in stores:
        assert_same_store(jobs / store.relative_to(one), store, folders=(tmp_path / "jobs", tmp_path / "one"))
    assert (tmp_path / "jobs" / "index.html").exists()
    with pytest.raises(ValueError, match="drop --detach"):
        run_all.main([*args, "--out", str(tmp_path / "x"), "--executor", "local", "--detach"])
