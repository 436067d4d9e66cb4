"""Scans: closed-form values on a quadratic, the real NLL and layer MSE against a naive copy-the-model loop,
bit-exact restoration of w0, SIGKILL resume, shards, the CLI, and errors raised before any point is
evaluated."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import random_tokens, tiny_model
from torch import nn

from landscape import cli
from landscape.engine.directions import (
    Direction,
    DirectionError,
    displacement_direction,
    layer_weight,
    orthogonalize,
    random_direction,
)
from landscape.engine.perturb import (
    FunctionObjective,
    NLLObjective,
    Perturbation,
    ScanResult,
    default_objectives,
    scan,
)
from landscape.engine.sweep import Execution
from landscape.objectives import layer_mse, nll
from landscape.quant.result import QuantResult
from landscape.store import RUN_SPECIFIC_KEYS, StoreMismatchError, merge_stores, partial_path, read_store
from landscape.weights import layer_weights, quantizable_layers, weights_fingerprint


class Quadratic(nn.Module):
    """Two bias-free float64 linear layers (3x2 and 2x2) whose 'loss' is c + 1/2 (w - w*)^T H (w - w*) over
    all 10 weights, with H symmetric positive definite; w* is random, or w0 itself if ``centred`` (a basin at
    w0)."""

    def __init__(self, seed: int = 0, centred: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = nn.Linear(2, 3, bias=False, dtype=torch.float64)
        self.second = nn.Linear(2, 2, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.first.weight.copy_(torch.randn(3, 2, generator=g, dtype=torch.float64))
            self.second.weight.copy_(torch.randn(2, 2, generator=g, dtype=torch.float64))
        a = torch.randn(10, 10, generator=g, dtype=torch.float64)
        self.hessian = a @ a.T + torch.eye(10, dtype=torch.float64)
        self.w_star = (self.flat_weights().clone() if centred
                       else torch.randn(10, generator=g, dtype=torch.float64))
        self.offset = 2.0

    def flat_weights(self) -> torch.Tensor:
        return torch.cat([self.first.weight.detach().flatten(), self.second.weight.detach().flatten()])

    def loss(self) -> float:
        delta = self.flat_weights() - self.w_star
        return float(self.offset + 0.5 * delta @ self.hessian @ delta)


def flat_np(direction: Direction) -> np.ndarray:
    return np.concatenate([direction["first"].numpy().ravel(), direction["second"].numpy().ravel()])


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert all(torch.equal(now[k], saved[k]) for k in saved), "weights differ from w0"


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(4, 16)


def test_2d_scan_of_a_quadratic_equals_the_closed_form():
    model = Quadratic()
    u = random_direction(model, 0, "none")
    v = random_direction(model, 1, "filter")
    a, b = np.linspace(-1, 2, 4), np.linspace(-0.5, 0.5, 3)
    result = scan(model, [u, v], [a, b], [FunctionObjective("loss", lambda m: m.loss())],
                  execution=Execution(progress=False))
    h, d0 = model.hessian.numpy(), model.flat_weights().numpy() - model.w_star.numpy()
    fu, fv = flat_np(u), flat_np(v)
    A, B = np.meshgrid(a, b, indexing="ij")
    closed_form = (model.offset + 0.5 * d0 @ h @ d0 + A * (fu @ h @ d0) + B * (fv @ h @ d0)
                   + 0.5 * A**2 * (fu @ h @ fu) + A * B * (fu @ h @ fv) + 0.5 * B**2 * (fv @ h @ fv))
    assert result.done.all() and result.grid_shape == (4, 3)
    np.testing.assert_allclose(result.values["loss"], closed_form, rtol=1e-12)


def test_nll_and_layer_mse_equal_a_naive_copy_of_the_model(gpt2, tokens):
    u = random_direction(gpt2, 3)
    a = np.array([-0.5, 1.0])
    result = scan(gpt2, u, a, default_objectives(tokens, with_layer_mse=True),
                  execution=Execution(progress=False))
    w0 = layer_weights(gpt2, u.names)
    for i, coefficient in enumerate(a):
        naive = copy.deepcopy(gpt2)
        with torch.no_grad():
            for name, module in quantizable_layers(naive).items():
                module.weight.add_(coefficient * u[name].T)  # Conv1D stores (in, out)
            # HF: mean over every predicted token
            loss = naive(input_ids=tokens.tokens, labels=tokens.tokens).loss
        assert result.values["nll"][i] == pytest.approx(float(loss), rel=1e-6)
        moved = {n: w0[n] + coefficient * u[n] for n in u.names}
        reference = layer_mse(gpt2, tokens, moved, inputs="reference")  # inputs of the unperturbed model
        for name in u.names:
            assert result.values[f"layer_mse/{name}"][i] == pytest.approx(reference[name], rel=1e-6,
                                                                          abs=1e-12)
            # with reference inputs the error is linear in the coefficient: MSE(a) = a^2 MSE(1)
            assert result.values[f"layer_mse/{name}"][i] == pytest.approx(coefficient**2 * result.values[
                f"layer_mse/{name}"][1], rel=1e-5, abs=1e-12)


def test_weights_are_bit_identical_to_w0_after_a_scan_and_after_an_exception(gpt2, tokens):
    saved = state(gpt2)
    u = random_direction(gpt2, 5, "none")
    name = u.names[0]
    w0 = quantizable_layers(gpt2)[name].weight.detach().T
    # restoring by subtraction would not be exact
    assert not torch.equal((w0 + 1e3 * u[name]) - 1e3 * u[name], w0)
    scan(gpt2, u, [1e3, -7.3], data=tokens, execution=Execution(progress=False))
    assert_bit_identical(gpt2, saved)

    calls = []

    def fails_on_second_point(model):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("objective failed mid-scan")
        return 0.0

    with pytest.raises(RuntimeError, match="mid-scan"):
        scan(gpt2, u, [1e3, -7.3, 2.0], [FunctionObjective("f", fails_on_second_point)],
             execution=Execution(progress=False))
    assert len(calls) == 2
    assert_bit_identical(gpt2, saved)


def test_shards_merged_equal_one_full_run(gpt2, tokens, tmp_path):
    u, v = random_direction(gpt2, 0), random_direction(gpt2, 1)
    grid = [[-1.0, 1.0], [-1.0, 0.5]]
    full = scan(gpt2, [u, v], grid, data=tokens,
                execution=Execution(store=tmp_path / "full.h5", progress=False))
    shards = [scan(gpt2, [u, v], grid, data=tokens,
                   execution=Execution(store=tmp_path / f"s{i}.h5", shard=(i, 3), progress=False)).path
              for i in range(3)]
    assert read_store(shards[0]).done.ravel().tolist() == [True, False, False, True]  # points 0, 0 + 3
    merged = ScanResult.from_store(merge_stores(tmp_path / "merged.h5", shards))
    assert merged.done.all() and np.array_equal(merged.values["nll"], full.values["nll"])
    strip = lambda p: {k: v for k, v in p.items() if k not in RUN_SPECIFIC_KEYS}  # noqa: E731
    assert strip(merged.provenance) == strip(full.provenance)
    assert (merged.provenance["model_fingerprint"]
            and merged.provenance["objectives"][0]["nll_convention"]["data_hash"])


KILLED_SCAN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the test process: the thread count is part of a store's provenance
    sys.path.insert(0, {tests!r})
    from test_perturb import GRID_2D, Quadratic
    from landscape.engine.directions import random_direction
    from landscape.engine.perturb import FunctionObjective, scan
    from landscape.engine.sweep import Execution

    path, kill_at = sys.argv[1], int(sys.argv[2])
    calls = []

    def loss_or_die(model):  # SIGKILL in the middle of a point, while the weights are perturbed
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return model.loss()

    model = Quadratic()
    directions = [random_direction(model, 0), random_direction(model, 1)]
    scan(model, directions, GRID_2D, [FunctionObjective("loss", loss_or_die)],
         execution=Execution(store=path, resume=True, progress=False))
    print("evaluated", len(calls))
""")
GRID_2D = [[-1.0, 0.0, 1.0], [-0.5, 0.5, 2.0]]


def test_a_scan_killed_with_sigkill_resumes_to_the_uninterrupted_store(tmp_path):
    script = tmp_path / "killed_scan.py"
    script.write_text(KILLED_SCAN.format(tests=os.path.dirname(__file__)))
    path = tmp_path / "killed.h5"
    killed = subprocess.run([sys.executable, str(script), str(path), "5"], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert read_store(partial_path(path)).done.sum() == 4 and not path.exists()  # every finished point kept
    resumed = subprocess.run([sys.executable, str(script), str(path), "0"], capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert "evaluated 5" in resumed.stdout.decode()  # only the unfinished points

    model = Quadratic()
    uninterrupted = scan(model, [random_direction(model, 0), random_direction(model, 1)], GRID_2D,
                         [FunctionObjective("loss", lambda m: m.loss())],
                         execution=Execution(store=tmp_path / "whole.h5", progress=False))
    a, b = read_store(path), read_store(uninterrupted.path)
    assert a.done.all() and set(a.arrays) == set(b.arrays)
    assert all(np.array_equal(a.arrays[n], b.arrays[n]) for n in a.arrays)
    strip = lambda p: {k: v for k, v in p.items() if k != "created"}  # noqa: E731
    assert strip(a.provenance) == strip(b.provenance)


def test_bad_input_is_refused_before_any_point_is_evaluated(gpt2, tokens, tmp_path):
    saved = state(gpt2)
    calls = []
    counting = [FunctionObjective("f", lambda m: calls.append(1) or 0.0)]
    u = random_direction(gpt2, 0)
    name = u.names[0]
    with pytest.raises(ValueError, match=r"non-finite coefficients \[nan\] at positions \[1\]"):
        scan(gpt2, u, [0.0, float("nan")], counting, execution=Execution(progress=False))
    with pytest.raises(DirectionError, match=r"shape \(3, 3\) for layer"):
        scan(gpt2, Direction({name: torch.ones(3, 3)}, u.spec), [1.0], counting,
             execution=Execution(progress=False))
    with pytest.raises(DirectionError, match="unknown layer 'lm_body'"):
        scan(gpt2, Direction({"lm_body": torch.ones(3, 3)}, u.spec), [1.0], counting,
             execution=Execution(progress=False))
    with pytest.raises(DirectionError, match="norm 0.0"):
        scan(gpt2, Direction({name: torch.zeros_like(u[name])}, u.spec), [1.0], counting,
             execution=Execution(progress=False))
    with pytest.raises(ValueError, match="2 axes but there are 1 directions"):
        scan(gpt2, u, [[1.0], [2.0]], counting, execution=Execution(progress=False))
    with pytest.raises(ValueError, match=r"0 <= i < n, got \(2, 2\)"):
        scan(gpt2, u, [1.0], counting, execution=Execution(shard=(2, 2), progress=False))
    with pytest.raises(DirectionError, match="made on base weights"):
        scan(tiny_model("gpt2", seed=1), u, [1.0], counting, execution=Execution(progress=False))

    # a store started for this model is refused for another model, before any evaluation
    def fails_after_one_point(model):
        if calls:
            raise RuntimeError("stop after one point")
        calls.append(1)
        return 0.0

    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="stop after one point"):
        scan(gpt2, u, [0.0, 1.0], [FunctionObjective("f", fails_after_one_point)],
             execution=Execution(store=path, progress=False))
    assert read_store(partial_path(path)).done.sum() == 1
    calls.clear()
    other = tiny_model("gpt2", seed=1)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        scan(other, random_direction(other, 0), [0.0, 1.0], counting,
             execution=Execution(store=path, resume=True, progress=False))
    assert not calls
    assert_bit_identical(gpt2, saved)


# --------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 and a byte-level BPE tokenizer saved as a local model directory (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the landscape around the pretrained weights"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tiny-local-model")
    tiny_model("gpt2", vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run_cli(argv: list[str]) -> int:
    import landscape.cli.scan  # noqa: F401  (registers scan, radius, merge)

    return cli.main(argv)


def test_cli_scan_shards_merge_displacement_and_radius(model_dir, tmp_path, capsys):
    from landscape.data import heldout_set
    from landscape.engine.basin import BasinStatistics
    from landscape.models import load_model
    from landscape.quant.result import QuantResult
    from landscape.weights import swapped_weights, weights_fingerprint

    lm = load_model(model_dir)
    data = heldout_set(lm.tokenizer, 16, "wiki", 2)
    data_args = ["--seq-len", "16", "--segments", "2", "--no-progress"]
    full = tmp_path / "full.h5"
    assert run_cli(["scan", model_dir, "--kind", "filter", "--grid", "-1:1:3", "--out", str(full),
                    *data_args]) == 0
    shards = [tmp_path / f"s{i}.h5" for i in range(2)]
    for i, shard in enumerate(shards):
        argv = ["scan", model_dir, "--grid", "-1:1:3", "--shard", f"{i}/2", "--out", str(shard), *data_args]
        assert run_cli(argv) == 0
    assert run_cli(["merge", str(tmp_path / "merged.h5"), *map(str, shards)]) == 0
    result, merged = ScanResult.from_store(full), ScanResult.from_store(tmp_path / "merged.h5")
    assert np.array_equal(result.values["nll"], merged.values["nll"])
    assert result.grid[0].tolist() == [-1.0, 0.0, 1.0]
    assert result.values["nll"][1] == pytest.approx(nll(lm.model, data).value, rel=1e-9)
    assert (result.directions[0].normalization == "filter"
            and result.provenance["model_info"]["architecture"] == "gpt2")

    w0 = layer_weights(lm.model)
    w_q = {n: torch.round(w * 16) / 16 for n, w in w0.items()}
    saved = QuantResult(w_q, None, "rtn-test", base_model=model_dir,
                        base_fingerprint=weights_fingerprint(lm.model, list(w_q))).save(tmp_path / "rtn")
    toward = tmp_path / "toward.h5"
    argv = ["scan", model_dir, "--kind", "displacement", "--quantized", str(saved), "--grid", "0:1:2",
            "--out", str(toward), *data_args]
    assert run_cli(argv) == 0
    with swapped_weights(lm.model, w_q):
        nll_quantized = nll(lm.model, data).value
    # a = 1: w_q
    assert ScanResult.from_store(toward).values["nll"][1] == pytest.approx(nll_quantized, rel=1e-6)

    radius = tmp_path / "radius.h5"
    argv = ["radius", model_dir, "--directions", "2", "--threshold", "0.01", "--profile", "0:0.5:3",
            "--tolerance", "0.05", "--quantized", str(saved), "--out", str(radius), *data_args]
    assert run_cli(argv) == 0
    stats = BasinStatistics.from_store(radius)
    assert [b.direction.seed for b in stats.per_direction] == [0, 1]
    assert (stats.profile_values.shape == (2, 3)
            and stats.center_value == pytest.approx(nll(lm.model, data).value))
    distance = float(torch.sqrt(sum(((w_q[n] - w0[n]).double() ** 2).sum() for n in w0)))
    assert stats.displacement_norms == {"rtn": pytest.approx(distance, rel=1e-6)}
    assert "R(w0) median" in capsys.readouterr().out

    # --low-memory streams the directions layer by layer: the same numbers, bit for bit
    low = {"toward": tmp_path / "toward-low.h5", "radius": tmp_path / "radius-low.h5"}
    assert run_cli(["scan", model_dir, "--kind", "displacement", "--quantized", str(saved), "--grid", "0:1:2",
                    "--low-memory", "--out", str(low["toward"]), *data_args]) == 0
    assert np.array_equal(ScanResult.from_store(low["toward"]).values["nll"],
                          ScanResult.from_store(toward).values["nll"])
    assert run_cli(["radius", model_dir, "--directions", "2", "--threshold", "0.01", "--profile", "0:0.5:3",
                    "--tolerance", "0.05", "--low-memory", "--out", str(low["radius"]), *data_args]) == 0
    streamed = BasinStatistics.from_store(low["radius"])
    assert [b.radius for b in streamed.per_direction] == [b.radius for b in stats.per_direction]
    assert np.array_equal(streamed.profile_values, stats.profile_values)
    capsys.readouterr()

    assert run_cli(["scan", model_dir, "--kind", "displacement", "--grid", "0:1:2", "--out",
                    str(tmp_path / "d.h5"), *data_args]) == 2
    assert "--kind displacement needs --quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["scan", model_dir, "--grid", "nan:1:3", "--out", str(tmp_path / "x.h5")])
    assert "grid must be START:STOP:COUNT" in capsys.readouterr().err


class CountingNLL(NLLObjective):
    """The NLL, also checking after the model ran that every touched layer reads w0 again."""

    def __call__(self, model, w0):
        values = super().__call__(model, w0)
        values["at_w0_after_forward"] = float(all(torch.equal(layer_weight(model, n), t) for n, t in
                                                  self.w0_copy.items()))
        return values

    def output_names(self, layers):
        return ("nll", "at_w0_after_forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_plane_of_two_saved_displacements_equals_the_resident_one(dtype, tokens, tmp_path):
    """Figure 5's plane, u = d1 / |d1| and v = orth(d2, d1) / |.|, both read a layer at a time from their
    files (each layer's difference formed from the model's w0 while it is applied): bit for bit the resident
    scan's NLLs."""
    model = tiny_model("llama", dtype=dtype)
    names = list(quantizable_layers(model))
    w0 = layer_weights(model, names)
    paths = []
    for k, step in enumerate((8, 4)):
        w_q = {n: torch.round(w0[n].float() * step) / step for n in names}
        paths.append(QuantResult(w_q, None, f"lattice-{k}", base_fingerprint=weights_fingerprint(model, names)
                                 ).save(tmp_path / f"q{k}"))

    def plane(streamed):
        d1, d2 = (displacement_direction(model, p, streamed=streamed) for p in paths)
        return [d1.unit(), orthogonalize(d2, d1).unit()]

    points = [(0.0, 0.0), (0.5, 0.2), (1.0, -0.4)]
    resident = Perturbation(model, plane(False))
    expected = [resident.measure(p, [NLLObjective(tokens, 2)])["nll"] for p in points]
    with Perturbation(model, plane(True), streamed=True) as streamed:
        assert [streamed.measure(p, [NLLObjective(tokens, 2)])["nll"] for p in points] == expected
    assert len(set(expected)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_perturbation_equals_the_resident_one_and_moves_one_layer_at_a_time(dtype, tokens):
    model = tiny_model("llama", dtype=dtype)
    saved = state(model)
    u, v = random_direction(model, 1, streamed=True), random_direction(model, 2, streamed=True)
    v = orthogonalize(v, u).unit()
    points = [(0.0, 0.0), (0.7, -0.3), (-2.0, 1.5)]
    resident = Perturbation(model, [u, v])
    expected = [resident.measure(p, [NLLObjective(tokens, 2)])["nll"] for p in points]
    objective = CountingNLL(tokens, 2)
    object.__setattr__(objective, "w0_copy", {n: layer_weight(model, n).detach().clone() for n in u.names})
    with Perturbation(model, [u, v], streamed=True) as streamed:
        measured = [streamed.measure(p, [objective]) for p in points]
    assert [m["nll"] for m in measured] == expected  # bit for bit, batches of 2 segments
    assert expected[1] != expected[0]
    assert all(m["at_w0_after_forward"] == 1.0 for m in measured)
    assert_bit_identical(model, saved)
    # a forward call that raises inside a layer leaves no layer moved
    name = u.names[3]
    failing = model.get_submodule(name).register_forward_hook(lambda *a: (_ for _ in ()).throw(
        RuntimeError("failed inside a layer")))
    try:
        with Perturbation(model, [u], streamed=True) as streamed, pytest.raises(RuntimeError, match="inside"):
            streamed.measure([5.0], [NLLObjective(tokens, 2)])
    finally:
        failing.remove()
    assert_bit_identical(model, saved)
    # objectives that read the weights cannot be measured layer by layer
    with pytest.raises(ValueError, match="forward-only"):
        Perturbation(model, [u], streamed=True).measure([1.0], [FunctionObjective("f", lambda m: 0.0)])
