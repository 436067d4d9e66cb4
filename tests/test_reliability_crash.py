"""Crash safety: a pipeline killed with SIGKILL at seeded random points resumes to the uninterrupted result,
keeps every finished point at every kill, and a reader of a store being written gets a clear "in progress"
error or the finished state, never a crash or half a record.

The pipeline (:func:`pipeline` in :data:`DRIVER`) runs three resumable stages on a tiny GPT-2 and wiki text:
a 1-D scan with layer MSE, a basin-radius search over three directions, and the quantization study
(:func:`landscape.studies.quant_table.run_quant_table`: RTN, GPTQ and QAFT, each saved as a QuantResult, then
evaluated). Every *event* is counted: each HDF5 dataset write and flush, each ``os.replace``, each
safetensors write and each forward pass of the model or of a decoder block. A run armed with ``kill_at = k``
sends itself SIGKILL just before event ``k``, wherever that falls (between a point's values and its done
flag, inside a store's creation, between the two files of a saved result, mid-training...).

A driver process imports everything once (single-threaded, so forking it is safe) and forks each run: first
the uninterrupted reference, then trials. The first kill of trial ``t`` falls in stage ``t % 3`` (in the first
three trials: inside the creation of that stage's store), later ones anywhere (seeded); each killed run is
followed by a copy of the run's directory (a snapshot), and the trial ends with a resume that completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from test_bad_inputs import save_local_model
from transformers import AutoTokenizer

from landscape.data import token_stream
from landscape.store import RUN_SPECIFIC_KEYS, StoreError, StoreInProgressError, partial_path, read_store

STORES = ("scan.h5", "radius.h5", "quant_table.h5")  # in pipeline order
WALL_TIME_ARRAYS = {"quant_table.h5": ("seconds",)}  # measurements of the run, not results
N_TRIALS, KILLS_PER_TRIAL, SCHEDULE_SEED = 6, 4, 20240611

DRIVER = textwrap.dedent("""
    import json, os, shutil, signal, sys, traceback
    from pathlib import Path

    import numpy as np
    import h5py
    import safetensors.torch
    import torch

    from landscape.engine.basin import RadiusSearch, basin_statistics
    from landscape.data import heldout_set
    from landscape.engine.directions import DirectionSpec, random_direction
    from landscape.models import load_model
    from landscape.engine.perturb import default_objectives, scan
    from landscape.engine.sweep import Execution
    from landscape.weights import decoder_blocks
    from landscape.store import ResultStore
    from landscape.studies.quant_table import Protocol, run_quant_table

    root, model_dir = Path(sys.argv[1]), sys.argv[2]
    n_trials, kills_per_trial, seed = (int(x) for x in sys.argv[3:6])
    STAGES = ("scan", "radius", "quant_table")


    def pipeline(out, kill_at):
        torch.set_num_threads(1)
        count, starts = [0], {"creations": []}

        def event():
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        def counted(function):
            def wrapper(*args, **kwargs):
                event()
                return function(*args, **kwargs)
            return wrapper

        h5py.Dataset.__setitem__ = counted(h5py.Dataset.__setitem__)
        h5py.File.flush = counted(h5py.File.flush)
        os.replace = counted(os.replace)
        safetensors.torch.save_file = counted(safetensors.torch.save_file)
        create = ResultStore.create
        ResultStore.create = lambda *args, **kwargs: (starts["creations"].append(count[0])
                                                      or create(*args, **kwargs))
        lm = load_model(model_dir)
        for module in [lm.model, *decoder_blocks(lm.model)]:
            module.register_forward_pre_hook(lambda *_: event())
        data = heldout_set(lm.tokenizer, 16, "wiki", 2)

        starts["scan"] = count[0]
        scan(lm.model, random_direction(lm.model, 0), [-1.0, -0.5, 0.0, 0.5, 1.0],
             default_objectives(data, True),
             execution=Execution(store=out / "scan.h5", resume=True, progress=False))
        starts["radius"] = count[0]
        basin_statistics(lm.model,
                         [DirectionSpec("random", seed=s, normalization="filter") for s in range(3)],
                         data=data, search=RadiusSearch(threshold=0.05, tolerance=0.2),
                         profile_radii=[1.0, 4.0],
                         execution=Execution(store=out / "radius.h5", resume=True, progress=False))
        starts["quant_table"] = count[0]
        protocol = Protocol(model=model_dir, calib_sequences=8, calib_seq_len=16, eval_corpora=("wiki",),
                            eval_seq_len=16, eval_segments=2, formats=("int4",),
                            methods=("rtn", "gptq", "qaft"), qaft_lr=1e-3, qaft_batch_size=4)
        run_quant_table(protocol, out, progress=False, lm=lm)
        starts["end"] = count[0]
        return starts


    def run(out, kill_at):
        pid = os.fork()
        if pid == 0:
            try:
                starts = pipeline(out, kill_at)
                (out / "events.json").write_text(json.dumps(starts))
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


    def copy_tree(out, target):
        for path in sorted(out.rglob("*")):
            if path.is_file():
                (target / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.relative_to(out))


    torch.set_num_threads(1)  # (OMP_NUM_THREADS=1 too): no thread pool exists when the driver forks
    load_model(model_dir)  # imports the model's classes once, here, so every fork starts warm
    reference = root / "reference"
    reference.mkdir()
    assert run(reference, None) == 0, "the uninterrupted run failed"
    starts = json.loads((reference / "events.json").read_text())
    bounds = {stage: (starts[stage], starts[after]) for stage, after in zip(STAGES, (*STAGES[1:], "end"))}
    rng = np.random.default_rng(seed)
    log = {"events": starts, "trials": []}
    for t in range(n_trials):
        out = root / f"trial{t}"
        out.mkdir()
        low, high = bounds[STAGES[t % len(STAGES)]]
        # first kill: in trials 0-2 the first event inside the stage's store creation, later uniform in the
        # stage
        first = starts["creations"][t] + 1 if t < len(STAGES) else int(rng.integers(low + 1, high + 1))
        schedule = [first]
        schedule += [int(rng.integers(1, starts["end"] + 1)) for _ in range(kills_per_trial - 1)]
        runs = []
        for i, kill_at in enumerate(schedule):
            status = run(out, kill_at)
            runs.append({"kill_at": kill_at, "status": status, "snapshot": f"trial{t}-after{i}"})
            copy_tree(out, root / runs[-1]["snapshot"])
            if status == 0:
                break
        if runs[-1]["status"] != 0:
            runs.append({"kill_at": None, "status": run(out, None), "snapshot": None})
        log["trials"].append(runs)
    (root / "log.json").write_text(json.dumps(log, indent=1))
""")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[Path, dict]:
    """Run the driver once: the reference run, then the trials; returns the root and the driver's log."""
    root = tmp_path_factory.mktemp("crash")
    model_dir = save_local_model(root / "model", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for split in ("train", "heldout"):  # token caches filled now, so every run sees the same events
        token_stream(tokenizer, "wiki", split)
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    driver = subprocess.run([sys.executable, str(root / "driver.py"), str(root), str(model_dir),
                             str(N_TRIALS), str(KILLS_PER_TRIAL), str(SCHEDULE_SEED)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return root, json.loads((root / "log.json").read_text())


def finished_points(directory: Path, store: str) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """``(done, point arrays)`` of a store in ``directory``: the finished file, else the partial one, else
    None. Raises if a file exists but cannot be read."""
    path = directory / store
    if not path.exists() and partial_path(path).exists():
        path = partial_path(path)
    if not path.exists():
        return None
    data = read_store(path)
    return data.done, {n: data.arrays[n] for n in data.point_arrays
                       if n not in WALL_TIME_ARRAYS.get(store, ())}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical numbers (NaN payloads included), or equal strings."""
    if a.dtype.kind in "OUS" or b.dtype.kind in "OUS":
        return a.shape == b.shape and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_every_trial_was_killed_then_resumed_to_completion(crashed):
    root, log = crashed
    assert log["events"]["end"] > 100  # enough events for kill points to land everywhere
    for runs in log["trials"]:
        assert runs[0]["status"] == -signal.SIGKILL  # the first kill of a fresh run always lands
        assert all(r["status"] in (-signal.SIGKILL, 0) for r in runs) and runs[-1]["status"] == 0
    stages = [r["kill_at"] for r in (runs[0] for runs in log["trials"])]
    bounds = [log["events"][s] for s in ("scan", "radius", "quant_table", "end")]
    # every stage
    assert [int(np.searchsorted(bounds, k) - 1) for k in stages] == [t % 3 for t in range(N_TRIALS)]


def test_no_finished_point_is_lost_and_each_equals_the_uninterrupted_run(crashed):
    root, log = crashed
    reference = {store: finished_points(root / "reference", store) for store in STORES}
    checked = 0
    for runs in log["trials"]:
        previous = {store: None for store in STORES}
        for r in (r for r in runs if r["snapshot"]):
            for store in STORES:
                state = finished_points(root / r["snapshot"], store)  # readable after every kill
                if state is None:
                    assert previous[store] is None, f"{store} vanished after kill at {r['kill_at']}"
                    continue
                done, arrays = state
                ref_arrays = reference[store][1]
                if previous[store] is not None:
                    assert (done >= previous[store]).all(), f"{store}: a finished point was lost"
                for name, array in arrays.items():
                    assert same_bits(array[done], ref_arrays[name][done]), f"{store}: {name} differs"
                previous[store] = done
                checked += int(done.sum())
    assert checked > 0


def test_resumed_stores_and_results_equal_the_uninterrupted_run(crashed):
    root, log = crashed
    strip = lambda p: {k: v for k, v in p.items() if k not in RUN_SPECIFIC_KEYS}  # noqa: E731
    for t in range(len(log["trials"])):
        trial = root / f"trial{t}"
        for store in STORES:
            resumed, whole = read_store(trial / store), read_store(root / "reference" / store)
            assert resumed.complete and sorted(resumed.arrays) == sorted(whole.arrays)
            for name, array in whole.arrays.items():
                if name not in WALL_TIME_ARRAYS.get(store, ()):
                    assert same_bits(resumed.arrays[name], array), f"trial {t}: {store} {name}"
            assert strip(resumed.provenance) == strip(whole.provenance)
        results = sorted(p.relative_to(root / "reference")
                         for p in (root / "reference").rglob("*.safetensors"))
        assert len(results) == 3  # rtn, gptq, qaft
        for result in results:
            assert (trial / result).read_bytes() == (root / "reference" / result).read_bytes(), str(result)
        leftovers = [p.name for p in trial.rglob("*") if p.suffix in (".partial", ".tmp", ".new")]
        assert leftovers == []


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from landscape.store import ResultStore

    path, started = sys.argv[1], sys.argv[2]
    store = ResultStore.create(path, {"kind": "test"}, {"value": ((3,), "f8")}, (40,))
    open(started, "w").close()
    for i in range(40):
        store.write_point(i, {"value": np.full(3, float(i))})
        time.sleep(0.02)
    store.finish()
""")


def test_a_reader_gets_a_clear_in_progress_error_or_the_finished_store(tmp_path):
    path, started = tmp_path / "run.h5", tmp_path / "started"
    (tmp_path / "writer.py").write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path), str(started)],
                              stderr=subprocess.PIPE)
    while not started.exists():
        assert writer.poll() is None, writer.stderr.read().decode()
        time.sleep(0.01)
    in_progress, finished = 0, 0
    while True:
        running = writer.poll() is None
        for target in (path, partial_path(path)):
            try:
                data = read_store(target)
            except StoreInProgressError as err:
                assert "in progress" in str(err) or "unfinished run is at" in str(err)
                in_progress += 1
            except StoreError as err:  # only once the run has finished and its partial file is gone
                assert target == partial_path(path) and not target.exists(), str(err)
            else:
                # the finished state, whole (also from the partial file between the writer's close and rename)
                assert data.complete
                assert all(data.arrays["value"][i].tolist() == [float(i)] * 3 for i in range(40))
                finished += target == path
        if not running:
            break
        time.sleep(0.005)
    assert writer.wait() == 0 and in_progress > 0 and finished > 0
