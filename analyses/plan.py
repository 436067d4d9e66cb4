"""The plan of a figure run: what each measurement costs, which stores it writes, and executing what is
missing.

A :class:`Step` is one measurement that writes one HDF5 store; it is done once that store exists. Steps shared
by several figures (the quantization tables, the model facts, the basin radius) are built here, so no figure
script imports another. Cost estimates (:class:`Costs`) are measured on 2 CPU cores with SmolLM2-135M
(``shared/FIELD_NOTES.md``) and scaled by parameter count for other models: they make the printed plan, not
the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
from tqdm.auto import tqdm

from analyses.profiles import SMOLLM2_PARAMETERS, approximate_parameters
from analyses.session import (
    Session,
    basin_store,
    check_data,
    eval_set,
    facts_store,
    format_seconds,
    model_protocols,
    parse_args,
    publish,
    quantized_model_path,
    session_from_args,
    table_dir,
    table_store,
)
from landscape import plots
from landscape.cli.common import cluster_settings
from landscape.cluster import ClusterSettings, Sweep, run_sweep, shard_folder, shard_store_path
from landscape.engine.basin import RadiusSearch, basin_statistics
from landscape.engine.directions import DirectionSpec
from landscape.engine.perturb import NLLObjective
from landscape.engine.sweep import Execution
from landscape.memory import MemoryPeak, MemoryWatch, release_freed_memory
from landscape.quant import parse_format
from landscape.store import finish_run, start_run
from landscape.studies.quant_table import Protocol, run_quant_table, variants
from landscape.weights import Base, quantizable_layers, select_layers, weight_matrix, weights_norm


# ---------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class Costs:
    """Seconds of work on 2 CPU cores for SmolLM2-135M (FIELD_NOTES.md; the layer-MSE slowdown is an
    estimate). Other models: scaled by parameter count, which underestimates overhead-bound tiny models."""

    model_load: float = 15.0             # cached fp32 safetensors (the one-time GGUF conversion: about 35 s)
    forward_tokens_per_s: float = 480.0  # one NLL evaluation over 16 x 256 tokens in 8.5 s (measured)
    layer_mse_slowdown: float = 1.6      # a forward with an error hook on every linear, vs a plain forward
    gptq_per_format: float = 220.0       # all 210 linears, true-sequential, act-order, 128 x 256 tokens
                                         # (measured)
    train_tokens_per_s: float = 165.0    # QAFT: 6-7 s per step of 4 x 256 tokens (measured, all 210 linears)
    hvp_tokens_per_s: float = 17.0       # one Hessian-vector product over 2 x 256 tokens in about 30 s
    lorc_svds: float = 15.0              # rank-r SVDs of the 210 error matrices
    recompute_slowdown: float = 1.3      # QAFT recomputing each block in the backward pass: one more forward

    def scale(self, model: str) -> float:
        """Cost relative to SmolLM2-135M: the parameter ratio, at least 1 % (small models are
        overhead-bound)."""
        n = approximate_parameters(model)
        return 1.0 if n is None else max(0.01, n / SMOLLM2_PARAMETERS)

    def forward(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.forward_tokens_per_s

    def layer_mse(self, model: str, tokens: int) -> float:
        return self.layer_mse_slowdown * self.forward(model, tokens)

    def train(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.train_tokens_per_s

    def hvp(self, model: str, tokens: int) -> float:
        return self.scale(model) * tokens / self.hvp_tokens_per_s

    def quant_table(self, protocol: Protocol) -> float:
        """One :func:`~landscape.studies.quant_table.run_quant_table` store: every variant quantized and
        evaluated."""
        m = protocol.model
        calib = protocol.calib_sequences * protocol.calib_seq_len
        mse = self.layer_mse(m, (protocol.layer_mse_sequences or protocol.calib_sequences)
                             * protocol.calib_seq_len)
        evaluation = self.forward(m, len(protocol.eval_corpora) * protocol.eval_segments
                                  * protocol.eval_seq_len)
        steps = max(1, round(protocol.qaft_epochs * protocol.calib_sequences / protocol.qaft_batch_size))
        finetune = (self.train(m, steps * protocol.qaft_batch_size * protocol.calib_seq_len)
                    * (self.recompute_slowdown if protocol.qaft_recompute_blocks else 1.0) + mse)
        method_cost = {"rtn": 0.0, "gptq": self.scale(m) * self.gptq_per_format * calib / 32768,
                       "gptq+lorc": self.scale(m) * self.lorc_svds, "qaft": finetune, "fp-finetune": finetune}
        method_cost["gptq-noact"] = method_cost["gptq"]
        total = evaluation  # the fp32 row
        for _ in protocol.formats:  # every row: its method, its layer MSE and its evaluation
            total += sum(method_cost[method] + mse + evaluation for method in protocol.methods)
        return total


COSTS = Costs()


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Step:
    """One measurement: it writes the store at ``store`` and is done once that file exists.

    Attributes:
        title: what it measures, for the plan.
        store: the finished store's path (written atomically by the library: it exists only when complete).
        estimate_s: estimated seconds (:class:`Costs`), for the plan and the progress bar.
        run: does the measurement (resuming a partial store where the library supports it).
        model: the model it needs (loaded once per session, only if some step runs).
        shard: for a step that is a sweep, ``(i, n) ->`` measures shard ``i`` of ``n`` into
            :func:`landscape.cluster.shard_store_path` of ``store`` (``make figures`` with ``--executor``
            runs the shards as jobs and merges them); ``None``: the step runs in this process.
        points: the points of such a sweep (its progress bar).
    """

    title: str
    store: Path
    estimate_s: float
    run: Callable[[], object] = field(repr=False, compare=False)
    model: str = ""
    shard: Callable[[int, int], object] | None = field(default=None, repr=False, compare=False)
    points: int = 0

    @property
    def done(self) -> bool:
        return self.store.exists()


def unique_steps(steps: Sequence[Step]) -> list[Step]:
    """``steps`` without repeats (several figures share a store), in first-seen order."""
    seen: dict[Path, Step] = {}
    for step in steps:
        seen.setdefault(step.store, step)
    return list(seen.values())


def plan_text(steps: Sequence[Step], session: Session) -> str:
    """The plan with estimated times, marking what the stores already hold."""
    steps = unique_steps(steps)
    todo = [s for s in steps if not s.done]
    models = dict.fromkeys(s.model for s in todo if s.model)
    load = sum(COSTS.model_load * min(1.0, 10 * COSTS.scale(m)) for m in models)
    lines = [f"Plan: {session.profile.name} protocol on {session.profile.model} "
             f"(estimates for 2 CPU cores; stores under {session.data})"]
    for s in steps:
        status = "stored" if s.done else "to do "
        lines.append(f"  [{status}] {s.title:<78} {'' if s.done else '~' + format_seconds(s.estimate_s):>12}")
    lines.append(f"  {len(todo)} of {len(steps)} measurements to do: about "
                 f"{format_seconds(sum(s.estimate_s for s in todo) + load)} "
                 f"(model loading {format_seconds(load)} included)")
    return "\n".join(lines)


@dataclass(frozen=True)
class StepReport:
    """What running a step took: wall time against its estimate, and its memory peak."""

    title: str
    seconds: float
    estimate_s: float
    peak: MemoryPeak

    def to_dict(self) -> dict[str, object]:
        return {"title": self.title, "seconds": self.seconds, "estimate_s": self.estimate_s,
                **self.peak.to_dict()}


def execute(steps: Sequence[Step], session: Session, cluster: ClusterSettings = ClusterSettings(),
            argv: Sequence[str] = ()) -> list[StepReport]:
    """Run the steps whose stores do not exist yet, in order, under one progress bar (in estimated
    seconds); each step's time and memory peak is printed as it finishes and returned.

    With an executor (``cluster``), a step that is a sweep (:attr:`Step.shard`) runs as ``cluster.jobs`` jobs
    of ``analyses.run_all`` (``argv``, the run's own arguments, plus ``--step KEY --shard i/n``), merged into
    its store before the next step starts; its memory peak is then the driver's, not the jobs'.
    """
    todo = [s for s in unique_steps(steps) if not s.done]
    reports: list[StepReport] = []
    if not todo:
        return reports
    for model in dict.fromkeys(s.model for s in todo if s.model):
        check_data(session, model)  # text too short for a model's calibration or evaluation fails here

    def weight(step: Step) -> int:  # estimated seconds, at least 1 so that every step moves the bar
        return max(1, round(step.estimate_s))

    with tqdm(total=sum(weight(s) for s in todo), desc="measurements", unit="s(est)",
              disable=not session.progress, dynamic_ncols=True) as bar:
        for step in todo:
            bar.set_postfix_str(step.title[:60])
            release_freed_memory()  # each step starts from what is alive, not from the last step's heap
            started = time.perf_counter()
            with MemoryWatch(session.device) as watch:
                if cluster.fans_out and step.shard is not None:
                    run_sweep(step_sweep(step, session, argv), cluster)
                else:
                    step.run()
            if not step.done:
                raise RuntimeError(f"step {step.title!r} finished without writing its store {step.store}")
            reports.append(StepReport(step.title, time.perf_counter() - started, step.estimate_s, watch.peak))
            bar.write(f"  done: {step.title} in {format_seconds(reports[-1].seconds)} "
                      f"(estimated {format_seconds(step.estimate_s)}; {watch.peak.describe()})")
            bar.update(weight(step))
    return reports


def figure_cluster(args: argparse.Namespace) -> ClusterSettings:
    """The executor of a figure run's sweep steps (checked before any work)."""
    cluster = cluster_settings(args)
    if cluster.detach:
        raise ValueError("a figure run waits for each step's jobs (later steps read their stores): drop "
                         "--detach")
    return cluster


def run_step_shard(steps: Sequence[Step], session: Session, key: str, shard: tuple[int, int]) -> int:
    """What one job of a sweep step runs: shard ``i`` of ``n`` of the step whose :func:`step_key` is
    ``key``."""
    found = {step_key(s, session): s for s in unique_steps(steps) if s.shard is not None}
    if key not in found:
        raise ValueError(f"--step {key!r} is not a sweep step of this run; its sweep steps: {sorted(found)}")
    found[key].shard(*shard)
    return 0


def step_key(step: Step, session: Session) -> str:
    """What names a step on the command line (``--step``): its store's path under the session's data."""
    return step.store.relative_to(session.data).as_posix()


def step_sweep(step: Step, session: Session, argv: Sequence[str]) -> Sweep:
    """A sweep step as jobs: each runs ``analyses.run_all`` with the same arguments on one shard."""
    key = step_key(step, session)
    return Sweep(f"step {key}", "analyses.run_all:main", tuple(argv),
                 lambda i, n: ["--step", key, "--shard", f"{i}/{n}"], {step.store: step.points},
                 shard_folder(step.store), job_flags=("--no-progress", "--no-png"))


def summary_text(reports: Sequence[StepReport]) -> str:
    """The steps a run measured, with time and memory peak, as a Markdown table."""
    lines = ["| step | time | estimated | peak RSS (GB) | added (GB) | device peak (GB) |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        device = "" if r.peak.device is None else f"{r.peak.device / 1e9:.2f}"
        lines.append(f"| {r.title} | {format_seconds(r.seconds)} | {format_seconds(r.estimate_s)} | "
                     f"{r.peak.rss / 1e9:.2f}{'' if r.peak.rss_exact else ' (lifetime)'} | "
                     f"{(r.peak.rss - r.peak.rss_before) / 1e9:.2f} | {device} |")
    return "\n".join(lines)


def record_run(session: Session, reports: Sequence[StepReport]) -> Path:
    """Append this run's step reports to ``<data>/runs.jsonl`` (one JSON line per run that measured
    something: date, profile, model, device, dtype, steps)."""
    path = session.data / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "profile": session.profile.name, "model": session.profile.model, "device": str(session.device),
            "dtype": str(session.dtype).removeprefix("torch."), "steps": [r.to_dict() for r in reports]}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return path


def quant_table_steps(session: Session, model: str,
                      protocols: Sequence[Protocol] | None = None) -> list[Step]:
    """One step per quantization table of ``model`` (:func:`landscape.studies.quant_table.run_quant_table`):
    ``protocols``, by default the session's tables of ``model``."""
    def step(protocol: Protocol) -> Step:
        methods = ", ".join(protocol.methods)
        def shard(i: int, n: int) -> Path:
            return run_quant_table(protocol, table_dir(session, protocol), progress=session.progress,
                                   lm=session.model(model), shard=(i, n))

        return Step(f"{model}: quant table {', '.join(protocol.formats)} ({methods})",
                    table_store(session, protocol), COSTS.quant_table(protocol),
                    lambda: shard(0, 1), model, shard, len(variants(protocol)))

    return [step(p) for p in (model_protocols(session, model) if protocols is None else protocols)]


def facts_step(session: Session, model: str) -> Step:
    """Sizes of ``model`` (parameters, quantized parameters, ``||w0||``): figure 2's bits and figure 7's
    x-axis."""

    def run() -> None:
        lm = session.model(model)
        # views of the model's weights, not copies
        w0 = {n: weight_matrix(m).detach() for n, m in quantizable_layers(lm.model).items()}
        arrays = {"n_params": ((), np.int64), "n_quantized": ((), np.int64), "w0_norm": ((), np.float64)}
        with start_run(facts_store(session, model), {"kind": "model_facts", "model": model,
                                                     "model_info": lm.info.to_dict()}, arrays) as record:
            record.write_point((), {"n_params": lm.info.n_params,
                                    "n_quantized": sum(w.numel() for w in w0.values()),
                                    "w0_norm": math.sqrt(sum(float(w.double().pow(2).sum())
                                                             for w in w0.values()))})
            record.write_table("layers", {"name": list(w0), "out_features": [w.shape[0] for w in w0.values()],
                                          "in_features": [w.shape[1] for w in w0.values()]})
            finish_run(record)

    return Step(f"{model}: model facts (parameter counts, ||w0||)", facts_store(session, model), 1.0, run,
                model)


def run_figure_script(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """``main`` of a figure script: plan, measure what the stores lack, build and publish its figure.

    ``module`` provides ``FIGURE`` (the file stem), ``steps(session) -> list[Step]`` and
    ``figure(session) -> go.Figure`` (from stores only); a study that also has tables provides
    ``report(session) -> str`` (markdown, from stores only), written beside the figure as ``FIGURE.md``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(module.__doc__ or module.FIGURE, argv)
    session = session_from_args(args)
    steps = module.steps(session)
    if args.step:
        return run_step_shard(steps, session, args.step, args.shard)
    cluster = figure_cluster(args)
    print(plan_text(steps, session), flush=True)
    if args.plan:
        return 0
    reports = execute(steps, session, cluster, argv)
    if reports:
        record_run(session, reports)
    print(publish(module.figure(session), session, module.FIGURE), flush=True)
    if hasattr(module, "report"):
        text = module.report(session)
        (session.out / f"{module.FIGURE}.md").write_text(text, encoding="utf-8")
        print(text, flush=True)
    return 0


def quantized_displacements(session: Session, model: str) -> dict[str, str]:
    """Table label -> saved result, for every quantized method at every format the tables run QAFT at."""
    out = {}
    for protocol in model_protocols(session, model):
        if "qaft" not in protocol.methods:
            continue
        for fmt in (parse_format(f).name for f in protocol.formats):
            for method in (m for m in protocol.methods if m in plots.QUANTIZED_METHODS):
                label = f"{method} {fmt}" + (" s0" if method == "qaft" else "")
                out[label] = str(quantized_model_path(session, model, method, fmt))
    return out


def basin_step(session: Session, model: str) -> Step:
    """R(w0) over the profile's random directions, with the radial profile and the displacement norms of the
    quantization tables' results (figures 4 and 7)."""
    settings = session.profile_for(model).basin

    def run(i: int = 0, n: int = 1) -> None:
        lm = session.model(model)
        base = Base(lm.model, model)
        layers = select_layers(lm.model)
        specs = [DirectionSpec("random", ("*",), seed=seed, normalization="filter",
                               base_fingerprint=base.fingerprint(layers))
                 for seed in range(settings.n_directions)]
        data = eval_set(session, model, settings.segments)
        search = RadiusSearch(settings.threshold, tolerance=settings.tolerance,
                              initial_fraction=settings.initial_fraction)
        store = basin_store(session, model)
        execution = Execution(store=store if n == 1 else shard_store_path(store, i, n), resume=True,
                              shard=(i, n), provenance={"model_info": lm.info.to_dict()},
                              progress=session.progress)
        basin_statistics(base, specs, NLLObjective(data, 4, model), data=data, search=search,
                         profile_radii=np.array(settings.profile_fractions) * weights_norm(lm.model, layers),
                         quant_results=quantized_displacements(session, model), execution=execution)

    profile = session.profile_for(model)
    evaluations = settings.n_directions * (len(settings.profile_fractions) + 5
                                           + np.log2(1 / settings.tolerance))
    estimate = evaluations * COSTS.forward(model, settings.segments * profile.eval_seq_len)
    return Step(f"{model}: basin radius along {settings.n_directions} random directions "
                f"({len(settings.profile_fractions)} profile radii + bisection)", basin_store(session, model),
                float(estimate), run, model, run, settings.n_directions)
