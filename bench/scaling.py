"""Scaling: scan and GPTQ time against model size, scan time against evaluation tokens, 2 shards against 1.

* **Model size**: random GPT-2 models of growing width and depth, ref-tiny (and SmolLM2-135M with
  ``--full``): engine time per scan point (fixed tokens) and whole-model GPTQ time (fixed calibration set).
  The slope of ``log time`` against ``log parameters`` says how each grows (1 = linear).
* **Evaluation tokens**: on ref-tiny, engine, naive loop and bare forward time per point as the tokens per
  point grow; the naive loop's extra cost (a deep copy) is fixed, so the engine's advantage shrinks as
  ``(forward + copy) / forward``.
* **Sharded sweep**: one 2-D scan run as one process (shard 0/1) and as two processes at once (shards
  0/2 and 1/2, each writing its own store, merged with :func:`landscape.store.merge_stores`). Reported:
  the speed-up of the scan itself (slowest shard) and end to end (process start, model load, merge); the
  merged values must equal the one-process values bit for bit (checked).

No targets: these are informational.

Run alone: ``python -m bench.scaling --profile quick [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    PROFILE_NAMES,
    ModelSpec,
    Row,
    Section,
    Table,
    bench_main,
    check_profile,
    configure_worker,
    describe_model,
    fmt_seconds,
    interleaved_medians,
    log_log_slope,
    n_parameters,
    python_command,
    random_token_set,
    worker_environment,
)
from bench.scan import bare_forward, engine_scan, naive_scan, plane
from landscape.engine.perturb import ScanResult
from landscape.engine.sweep import Execution
from landscape.quant.gptq import gptq

REF_TINY = ModelSpec("ref-tiny", "pretrained")


@dataclass(frozen=True)
class ScalingSettings:
    """Sizes of the scaling benchmark.

    Attributes:
        size_models: models of growing size (scan and GPTQ times against parameters).
        eval_segments, seq_len: evaluation tokens per scan point in the model-size series.
        calib_segments: calibration sequences (of ``seq_len``) of the GPTQ runs.
        grid_points: points per axis of the 2-D grids timed in the size and token series (time per point
            reported: a scan's fixed set-up is shared by its points, as in a real sweep).
        token_model: the model of the evaluation-token series (and of the sharded sweep).
        token_segments: segments (of ``token_seq_len``) per point in the token series.
        token_seq_len: tokens per segment in the token series and the sharded sweep.
        shard_grid_points: points per axis of the sharded 2-D scan; ``shard_segments``: its segments per
            point.
        repeats: timed repeats (medians).
    """

    size_models: tuple[ModelSpec, ...]
    eval_segments: int = 4
    seq_len: int = 64
    calib_segments: int = 8
    grid_points: int = 3
    token_model: ModelSpec = REF_TINY
    token_segments: tuple[int, ...] = (1, 2, 4, 8, 16)
    token_seq_len: int = 128
    shard_grid_points: int = 16
    shard_segments: int = 16
    repeats: int = 3


SIZE_SERIES = (ModelSpec("gpt2-h32-l2", "gpt2", hidden=32, layers=2, vocab=512),
               ModelSpec("gpt2-h64-l2", "gpt2", hidden=64, layers=2, vocab=512),
               ModelSpec("gpt2-h128-l4", "gpt2", hidden=128, layers=4, vocab=512),
               ModelSpec("gpt2-h256-l4", "gpt2", hidden=256, layers=4, vocab=512),
               REF_TINY)
PROFILES: dict[str, ScalingSettings] = {
    "tiny": ScalingSettings((ModelSpec("tiny-gpt2", hidden=16, layers=1),
                             ModelSpec("tiny-gpt2-l2", hidden=32)),
                            2, 16, 2, 2, ModelSpec("tiny-gpt2", hidden=16, layers=1), (1, 2), 32, 2, 2, 1),
    "quick": ScalingSettings(SIZE_SERIES),
    "full": ScalingSettings((*SIZE_SERIES, ModelSpec("smollm2-135m", "pretrained")), repeats=3),
}


# ----------------------------------------------------------------------------------------- the series
def size_series(settings: ScalingSettings) -> list[dict]:
    """Engine seconds per point and GPTQ seconds (whole model, int4) for each model of the size series."""
    cases = []
    for spec in settings.size_models:
        model = spec.build()
        data = random_token_set(model, settings.eval_segments, settings.seq_len)
        calib = random_token_set(model, settings.calib_segments, settings.seq_len, seed=1)
        u, v = plane(model)
        axis = np.linspace(-0.5, 0.5, settings.grid_points)
        batch = settings.eval_segments
        t = interleaved_medians({
            "scan": lambda: engine_scan(model, u, v, axis, data, batch),
            "gptq": lambda: gptq(model, calib, "int4", progress=False),
        }, repeats=settings.repeats)
        cases.append({"model": describe_model(spec.name, model), "parameters": n_parameters(model),
                      "scan_seconds_per_point": t["scan"].median / axis.size**2,
                      "gptq_seconds": t["gptq"].median, "timings": {k: x.to_dict() for k, x in t.items()}})
    return cases


def token_series(settings: ScalingSettings) -> tuple[str, list[dict]]:
    """Engine, naive loop and bare forward seconds per point on one model as the evaluation tokens grow.

    Returns the model's description and one case per token count.
    """
    model = settings.token_model.build()
    u, v = plane(model)
    axis = np.linspace(-0.5, 0.5, settings.grid_points)
    points = axis.size**2
    cases = []
    for segments in settings.token_segments:
        data = random_token_set(model, segments, settings.token_seq_len)
        batch = min(segments, 4)
        t = interleaved_medians({
            "engine": lambda: engine_scan(model, u, v, axis, data, batch),
            "naive": lambda: naive_scan(model, u, v, axis, data, batch),
            "forward": lambda: bare_forward(model, data, batch),
        }, repeats=settings.repeats)
        per_point = {"engine": t["engine"].median / points, "naive": t["naive"].median / points,
                     "forward": t["forward"].median}
        cases.append({"tokens": segments * settings.token_seq_len,
                      **{f"{k}_seconds": x for k, x in per_point.items()},
                      "timings": {k: x.to_dict() for k, x in t.items()}})
    return describe_model(settings.token_model.name, model), cases


def shard_worker(index: int, count: int, store: Path, settings: ScalingSettings) -> dict:
    """Inside a worker process: load the token model, run shard ``index/count`` of the sweep into
    ``store``."""
    from landscape.engine.perturb import scan

    start = time.perf_counter()
    model = settings.token_model.build()
    data = random_token_set(model, settings.shard_segments, settings.token_seq_len)
    axis = np.linspace(-0.5, 0.5, settings.shard_grid_points)
    directions = plane(model)
    loaded = time.perf_counter()
    scan(model, directions, (axis, axis), data=data, batch_size=4,
         execution=Execution(store=store, shard=(index, count), progress=False))
    return {"load_seconds": loaded - start, "scan_seconds": time.perf_counter() - loaded}


def sharded_sweep(profile: str, settings: ScalingSettings) -> dict:
    """The same sweep as 1 process and as 2 concurrent processes; merged values checked against 1 process."""
    with tempfile.TemporaryDirectory(prefix="landscape-bench-") as tmp:
        folder = Path(tmp)

        def launch(index: int, count: int) -> subprocess.Popen:
            command = python_command("scaling", "--shard-worker", str(index), str(count),
                                     str(folder / f"shard-{index}-of-{count}.h5"), "--profile", profile)
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=worker_environment())

        def finish(processes: list[subprocess.Popen]) -> list[dict]:
            reports = []
            for p in processes:
                out, err = p.communicate(timeout=1800)
                if p.returncode != 0:
                    raise RuntimeError(f"shard worker failed (exit {p.returncode}):\n{err[-3000:]}")
                reports.append(json.loads(out.strip().splitlines()[-1]))
            return reports

        start = time.perf_counter()
        one = finish([launch(0, 1)])
        one_wall = time.perf_counter() - start
        start = time.perf_counter()
        two = finish([launch(0, 2), launch(1, 2)])
        from landscape.store import merge_stores

        merged = merge_stores(folder / "merged.h5", [folder / "shard-0-of-2.h5", folder / "shard-1-of-2.h5"])
        two_wall = time.perf_counter() - start
        single = ScanResult.from_store(folder / "shard-0-of-1.h5").values["nll"]
        combined = ScanResult.from_store(merged).values["nll"]
    if not np.array_equal(single, combined):
        raise AssertionError(f"the merged 2-shard sweep differs from the 1-process sweep by up to "
                             f"{float(np.nanmax(np.abs(single - combined))):.3g} nats/token: points must be "
                             f"pure functions of (model, directions, coordinates, data)")
    return {"points": settings.shard_grid_points**2,
            "tokens_per_point": settings.shard_segments * settings.token_seq_len,
            "one_process": {"wall_seconds": one_wall, **one[0]},
            "two_processes": {"wall_seconds": two_wall, "shards": two},
            "scan_speedup": one[0]["scan_seconds"] / max(s["scan_seconds"] for s in two),
            "wall_speedup": one_wall / two_wall, "merged_equals_single": True}


# ------------------------------------------------------------------------------------------ the bench
def run(profile: str = "quick") -> Section:
    """The scaling benchmark of a profile (``tiny``, ``quick``, ``full``) as a :class:`Section`."""
    settings = PROFILES[check_profile(profile)]
    started = time.perf_counter()
    sizes = size_series(settings)
    token_name, tokens = token_series(settings)
    shards = sharded_sweep(profile, settings)
    data = {"settings": {"size_models": [m.name for m in settings.size_models],
                         "eval_segments": settings.eval_segments, "seq_len": settings.seq_len,
                         "calib_segments": settings.calib_segments, "token_model": settings.token_model.name,
                         "token_segments": list(settings.token_segments),
                         "token_seq_len": settings.token_seq_len,
                         "shard_grid_points_per_axis": settings.shard_grid_points,
                         "shard_segments": settings.shard_segments, "repeats": settings.repeats},
            "model_size": sizes, "token_model": token_name, "tokens": tokens, "sharded_sweep": shards}
    return build_section(data, time.perf_counter() - started)


def build_section(data: dict, seconds: float = 0.0) -> Section:
    """The section (rows, tables, notes; no targets) from the raw measurements ``data`` alone."""
    settings, sizes, tokens, shards = (data["settings"], data["model_size"], data["tokens"],
                                       data["sharded_sweep"])
    token_name = data["token_model"]
    params = [c["parameters"] for c in sizes]
    scan_slope = log_log_slope(params, [c["scan_seconds_per_point"] for c in sizes])
    gptq_slope = log_log_slope(params, [c["gptq_seconds"] for c in sizes])
    token_slope = log_log_slope([c["tokens"] for c in tokens], [c["engine_seconds"] for c in tokens])
    rows = (
        Row("scaling", f"{len(sizes)} models, {sizes[0]['model']} .. {sizes[-1]['model']}",
            "scan time per point ~ parameters^slope", scan_slope, "", None,
            f"{settings['eval_segments']} x {settings['seq_len']} tokens per point"),
        Row("scaling", f"{len(sizes)} models, {sizes[0]['model']} .. {sizes[-1]['model']}",
            "GPTQ time (whole model, int4) ~ parameters^slope", gptq_slope, "", None,
            f"{settings['calib_segments']} x {settings['seq_len']} calibration tokens"),
        Row("scaling", f"{token_name}, {tokens[0]['tokens']:,} .. {tokens[-1]['tokens']:,} tokens per point",
            "scan time per point ~ tokens^slope", token_slope, "", None, ""),
        Row("scaling", f"{token_name}, {shards['points']}-point 2-D sweep, {shards['tokens_per_point']:,} "
            f"tokens per point", "2 processes / 1 process: scan speed-up", shards["scan_speedup"], "x", None,
            f"end to end (start, load, merge) {shards['wall_speedup']:.2f}x; merged = single bit for bit"),
    )
    tables = (
        Table("Model size (seconds, medians)", ("model", "parameters", "scan per point", "GPTQ whole model"),
              tuple((c["model"], f"{c['parameters']:,}", fmt_seconds(c["scan_seconds_per_point"]),
                     fmt_seconds(c["gptq_seconds"])) for c in sizes)),
        Table(f"Evaluation tokens per point ({token_name}; seconds per point, medians)",
              ("tokens", "engine", "naive loop", "bare forward", "naive / engine", "engine / forward"),
              tuple((f"{c['tokens']:,}", fmt_seconds(c["engine_seconds"]), fmt_seconds(c["naive_seconds"]),
                     fmt_seconds(c["forward_seconds"]), f"{c['naive_seconds'] / c['engine_seconds']:.2f}",
                     f"{c['engine_seconds'] / c['forward_seconds']:.2f}") for c in tokens)),
        Table("Sharded sweep (seconds)", ("processes", "scan (slowest shard)", "model load", "end to end"),
              (("1", *(fmt_seconds(shards["one_process"][k])
                       for k in ("scan_seconds", "load_seconds", "wall_seconds"))),
               ("2", fmt_seconds(max(s["scan_seconds"] for s in shards["two_processes"]["shards"])),
                fmt_seconds(max(s["load_seconds"] for s in shards["two_processes"]["shards"])),
                fmt_seconds(shards["two_processes"]["wall_seconds"])))),
    )
    few, many = tokens[0], tokens[-1]
    notes = (f"Naive loop / engine is {few['naive_seconds'] / few['engine_seconds']:.2f}x at "
             f"{few['tokens']:,} tokens per point and {many['naive_seconds'] / many['engine_seconds']:.2f}x "
             f"at {many['tokens']:,}: the naive loop's extra cost (a deep copy) is fixed per point while the "
             f"forward pass both pay grows with the tokens (engine time ~ tokens^{token_slope:.2f}), so the "
             f"ratio is largest for the cheapest points and tends to 1 as evaluations grow.",
             f"Two shards on a machine with 2 cores shared with other jobs: the scan speed-up "
             f"({shards['scan_speedup']:.2f}x) is bounded by the cores actually free (see the load average "
             f"above); points are independent, so on idle cores it approaches the number of processes. End "
             f"to end ({shards['wall_speedup']:.2f}x) also pays each process's start-up and model load.")
    return Section("scaling", "Scaling with model size, evaluation tokens and processes", rows, tables, notes,
                   {**data, "slopes": {"scan_vs_parameters": scan_slope, "gptq_vs_parameters": gptq_slope,
                                       "scan_vs_tokens": token_slope}}, seconds)


def main(argv: list[str] | None = None) -> int:
    """``--shard-worker I N STORE --profile P``: one shard of the sweep (JSON on stdout); otherwise the
    benchmark."""
    argv = sys.argv[1:] if argv is None else argv
    if "--shard-worker" not in argv:
        return bench_main(run, argv)
    parser = argparse.ArgumentParser(description="one shard of the sharded sweep, in this process")
    parser.add_argument("--shard-worker", nargs=3, metavar=("INDEX", "COUNT", "STORE"), required=True)
    parser.add_argument("--profile", default="quick", choices=PROFILE_NAMES)
    args = parser.parse_args(argv)
    configure_worker()
    index, count, store = int(args.shard_worker[0]), int(args.shard_worker[1]), Path(args.shard_worker[2])
    print(json.dumps(shard_worker(index, count, store, PROFILES[args.profile])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
