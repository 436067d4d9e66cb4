"""Memory: peak RSS of a 2-D scan and of QAFT, relative to the model's size, each in a fresh process.

Every workload runs in its own fresh worker process (``python -m bench.memory --worker WORKLOAD``) that

1. builds the model and the tokens, imports everything the workload needs and runs one warm-up forward
   pass on one short sequence (so lazy initialisation is not counted);
2. takes the **baseline** = its RSS now (model loaded), and resets the kernel's peak-RSS mark
   (``/proc/self/clear_refs``; where that is not allowed the peak since start is used);
3. runs the workload and reports ``peak RSS - baseline``: the memory the workload added.

Workers run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then returns every freed block of 128 KiB or
more to the system at once, so RSS follows the live tensors instead of what the allocator keeps cached.

Workloads: ``scan`` (:func:`landscape.engine.perturb.scan` over a 2-D grid of two random directions, including
building the directions) against ``forward`` (its activations: one no-grad forward and NLL of one
evaluation batch), and ``qaft`` (:func:`landscape.quant.qaft.qaft`, a few steps) against ``train-step`` (its
activations: one forward and backward of one training batch with gradients for the trained weights, what
any gradient method holds). The reported figure is the peak in model sizes with the activations taken
out: ``1 + (extra - extra of the reference) / model bytes``. Targets (issue 18): a scan at most 1.3 model
sizes (only the touched layer's w0 and direction beside the model); QAFT at most 4.5 (AdamW's floor is 4:
latent weights, gradients and two moments of the trained layers, beside the model).

Run alone: ``python -m bench.memory --profile quick [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.common import (
    MIB,
    PROFILE_NAMES,
    ModelSpec,
    Row,
    Section,
    Table,
    Target,
    bench_main,
    check_profile,
    configure_worker,
    describe_model,
    parameter_bytes,
    python_command,
    random_token_set,
    worker_environment,
)
from landscape.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

# (model + extra - activations) / model, per workload
MODEL_SIZES_AT_PEAK = {"scan": Target(1.3, "at_most"), "qaft": Target(4.5, "at_most")}
WORKLOADS = ("forward", "scan", "train-step", "qaft")
REFERENCE_OF = {"scan": "forward", "qaft": "train-step"}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class MemorySettings:
    """Sizes of the memory benchmark.

    Attributes:
        models: the models (large enough that the model dwarfs allocator noise of a few MiB).
        eval_segments, seq_len, batch_size: evaluation tokens of the scan (and of the forward reference).
        grid_points: points per axis of the 2-D scan.
        qaft_steps, qaft_batch_size, qaft_format: the QAFT run (its calibration set has
            ``qaft_steps * qaft_batch_size`` sequences of ``seq_len``).
    """

    models: tuple[ModelSpec, ...]
    eval_segments: int = 4
    seq_len: int = 128
    batch_size: int = 4
    grid_points: int = 3
    qaft_steps: int = 2
    qaft_batch_size: int = 4
    qaft_format: str = "int4"


MEM_GPT2 = ModelSpec("mem-gpt2", "gpt2", hidden=512, layers=4, vocab=8192, context=128)
PROFILES: dict[str, MemorySettings] = {
    "tiny": MemorySettings((ModelSpec("tiny-gpt2", hidden=32, layers=1),), 2, 16, 2, 2, 1, 2),
    "quick": MemorySettings((MEM_GPT2,)),
    "full": MemorySettings((MEM_GPT2, ModelSpec("smollm2-135m", "pretrained"))),
}


# --------------------------------------------------------------------------------------------- worker
def run_workload(workload: str, spec: ModelSpec, settings: MemorySettings) -> dict:
    """Inside a fresh process: build, warm up, take the baseline, run ``workload``, report RSS (bytes)."""
    from bench.scan import plane
    from landscape.engine.perturb import scan
    from landscape.engine.sweep import Execution
    from landscape.objectives import segment_nll_sums
    from landscape.quant.qaft import FinetuneSettings, qaft
    from landscape.weights import quantizable_layers, weight_matrix

    if workload not in WORKLOADS:
        raise ValueError(f"unknown memory workload {workload!r}; accepted: {', '.join(WORKLOADS)}")
    model = spec.build()
    evaluation = random_token_set(model, settings.eval_segments, settings.seq_len)
    calib = random_token_set(model, settings.qaft_steps * settings.qaft_batch_size, settings.seq_len, seed=1)
    trained = quantizable_layers(model)
    with torch.no_grad():
        model(input_ids=evaluation.tokens[:1, :8])  # warm-up on 8 tokens
    gc.collect()
    baseline = current_rss_bytes()
    exact_peak = reset_peak_rss()
    started = time.perf_counter()
    if workload == "forward":  # what one scan point needs: the forward and the NLL of one batch
        with torch.no_grad():
            segment_nll_sums(model, evaluation.tokens[: settings.batch_size],
                             evaluation.score_mask[: settings.batch_size])
    elif workload == "scan":
        axis = np.linspace(-0.5, 0.5, settings.grid_points)
        scan(model, plane(model), (axis, axis), data=evaluation, batch_size=settings.batch_size,
             execution=Execution(progress=False))
    elif workload == "train-step":
        for p in model.parameters():
            p.requires_grad_(False)
        for module in trained.values():
            module.weight.requires_grad_(True)
        batch = calib.subset(slice(0, settings.qaft_batch_size))
        loss = segment_nll_sums(model, batch.tokens, batch.score_mask).sum() / batch.n_scored_tokens
        loss.backward()
    else:
        qaft(model, calib, settings.qaft_format,
             FinetuneSettings(steps=settings.qaft_steps, batch_size=settings.qaft_batch_size), progress=False)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    trained_bytes = sum(weight_matrix(m).numel() * weight_matrix(m).element_size() for m in trained.values())
    return {"workload": workload, "model": describe_model(spec.name, model), "baseline_bytes": baseline,
            "peak_bytes": peak, "extra_bytes": peak - baseline, "model_bytes": parameter_bytes(model),
            "perturbed_bytes": trained_bytes, "exact_peak_reset": exact_peak, "seconds": seconds}


def measure_in_fresh_process(workload: str, spec: ModelSpec, profile: str) -> dict:
    """Run one workload in a new Python process (see the module docstring) and return its report."""
    command = python_command("memory", "--worker", workload, "--model", spec.name, "--profile", profile)
    done = subprocess.run(command, capture_output=True, text=True, env={**worker_environment(), **MALLOC_ENV},
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {workload} on {spec.name} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the bench
def design_estimate(workload: str, perturbed_bytes: int) -> int:
    """Bytes the workload must add beyond its activation reference, by construction of the code.

    scan: a saved copy of w0 for exact restores plus the two direction tensors (3 x the perturbed weights).
    qaft, during a step: the latent weights, their gradients, two AdamW moments and the fake-quantized weights
    the backward pass keeps (5 x the trained weights; w0 is read from the model, and the optimiser is freed
    before the final layer-MSE pass), less the gradient that the train-step reference holds already (4 x).
    """
    return {"scan": 3, "qaft": 4}[workload] * perturbed_bytes


def run(profile: str = "quick") -> Section:
    """The memory benchmark of a profile (``tiny``, ``quick``, ``full``) as a :class:`Section`."""
    settings = PROFILES[check_profile(profile)]
    started = time.perf_counter()
    cases = [{w: measure_in_fresh_process(w, spec, profile) for w in WORKLOADS} for spec in settings.models]
    data = {"settings": {"models": [m.name for m in settings.models], "eval_segments": settings.eval_segments,
                         "seq_len": settings.seq_len, "batch_size": settings.batch_size,
                         "grid_points_per_axis": settings.grid_points, "qaft_steps": settings.qaft_steps,
                         "qaft_batch_size": settings.qaft_batch_size, "qaft_format": settings.qaft_format,
                         "malloc": MALLOC_ENV},
            "cases": cases}
    return build_section(data, time.perf_counter() - started)


def model_sizes_at_peak(measured: dict, reference: dict) -> float:
    """``1 + (added - added by the reference) / model bytes``: the peak in model sizes, activations taken
    out."""
    return 1.0 + (measured["extra_bytes"] - reference["extra_bytes"]) / measured["model_bytes"]


def miss_note(workload: str, measured: dict, value: float) -> str:
    """Why ``workload`` needs more model sizes than its target, by how much, and what would close it."""
    fraction = measured["perturbed_bytes"] / measured["model_bytes"]
    estimate = 1 + design_estimate(workload, measured["perturbed_bytes"]) / measured["model_bytes"]
    if workload == "scan":
        why = (f"the engine never copies the model, but it holds three weight-sized tensors of the perturbed "
               f"layers ({fraction:.0%} of the model): the saved w0 that makes every restore bit-exact and "
               f"the two directions u and v (design estimate {estimate:.2f}). Closing it: regenerate each "
               f"layer's direction from its seed when a point is set (directions are stored as seeds "
               f"already), leaving only w0 ({1 + fraction:.2f} model sizes here), or perturb one "
               f"block at a time.")
    else:
        why = (f"QAFT trains every quantized weight ({fraction:.0%} of the model) with AdamW, so latent "
               f"weights, gradients, two moments and the fake-quantized weights the backward pass keeps are "
               f"each weight-sized (design estimate {estimate:.2f}; w0 is read from the model and the "
               f"optimiser is freed before the final layer-MSE pass). Going lower needs a leaner method: "
               f"--optimizer sgd (one moment), training block by block, or 8-bit / factored moments.")
    return (f"{measured['model']}, {workload}: {value:.2f} model sizes, which "
            f"{MODEL_SIZES_AT_PEAK[workload].miss_text(value)}. Why: {why}")


def build_section(data: dict, seconds: float = 0.0) -> Section:
    """The section (rows with targets, tables, notes) from the raw measurements ``data`` alone."""
    settings = data["settings"]
    points, tokens = (settings["grid_points_per_axis"],
                      f"{settings['eval_segments']} x {settings['seq_len']} tokens")
    what = {"scan": f"2-D scan, {points}x{points} points, {tokens}",
            "qaft": f"QAFT {settings['qaft_format']}, {settings['qaft_steps']} steps of "
                    f"{settings['qaft_batch_size']} x {settings['seq_len']} tokens"}
    rows, table, notes = [], [], []
    for c in data["cases"]:
        for workload, reference in REFERENCE_OF.items():
            m, r = c[workload], c[reference]
            value, model_mib = model_sizes_at_peak(m, r), m["model_bytes"] / MIB
            estimate = 1 + design_estimate(workload, m["perturbed_bytes"]) / m["model_bytes"]
            rows.append(Row("memory", f"{m['model']}, {what[workload]}",
                            "peak in model sizes, activations excluded", value, "x",
                            MODEL_SIZES_AT_PEAK[workload],
                            f"+{m['extra_bytes'] / MIB:.0f} MiB over the loaded model ({model_mib:.0f} MiB); "
                            f"{reference} alone +{r['extra_bytes'] / MIB:.0f} MiB"))
            table.append((m["model"], workload, f"{model_mib:.1f}", f"{m['baseline_bytes'] / MIB:.0f}",
                          f"{m['extra_bytes'] / MIB:.1f}", f"{r['extra_bytes'] / MIB:.1f} ({reference})",
                          f"{value:.2f}", f"{estimate:.2f}"))
            if not MODEL_SIZES_AT_PEAK[workload].met(value):
                notes.append(miss_note(workload, m, value))
    tables = (Table("Peak RSS over the loaded model (MiB), each in a fresh process",
                    ("model", "workload", "model", "baseline RSS", "added at peak", "reference added",
                     "model sizes (measured)", "model sizes (design estimate)"), tuple(table)),)
    return Section("memory", "Memory: peak RSS of a 2-D scan and of QAFT", tuple(rows), tables, tuple(notes),
                   data, seconds)


def main(argv: list[str] | None = None) -> int:
    """``--worker WORKLOAD --model NAME --profile P``: one measurement, JSON on stdout; otherwise the
    benchmark."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" not in argv:
        return bench_main(run, argv)
    parser = argparse.ArgumentParser(description="one memory measurement in this (fresh) process")
    parser.add_argument("--worker", required=True, choices=WORKLOADS)
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile", default="quick", choices=PROFILE_NAMES)
    args = parser.parse_args(argv)
    configure_worker()
    settings = PROFILES[args.profile]
    specs = {m.name: m for m in settings.models}
    if args.model not in specs:
        parser.error(f"model {args.model!r} is not in profile {args.profile!r}: {sorted(specs)}")
    print(json.dumps(run_workload(args.worker, specs[args.model], settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
