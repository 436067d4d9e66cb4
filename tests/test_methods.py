"""The registry of quantization methods: every name runs the library function it stands for, bit for bit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import random_tokens, tiny_model

from landscape.models import LoadedModel, ModelInfo
from landscape.quant import (
    METHODS,
    QUANT_TABLE_METHODS,
    FinetuneSettings,
    GenerationSettings,
    GPTQSettings,
    LearningRateSweepSettings,
    QAFTError,
    QuantJob,
    UnknownMethodError,
    fp_finetune,
    gptq,
    llm_qat,
    lorc,
    paired_control,
    qaft,
    rtn,
    run_method,
    select_learning_rate,
)
from landscape.weights import Base, weights_fingerprint

SETTINGS = FinetuneSettings(lr=2e-3, steps=2, batch_size=4, seed=3)


def same_weights(a, b) -> bool:
    return list(a.weights) == list(b.weights) and all(torch.equal(w, b.weights[n])
                                                      for n, w in a.weights.items())


@pytest.fixture(scope="module")
def setting():
    model = tiny_model("gpt2")
    return Base(model, "tiny-gpt2"), random_tokens(8, 16)


def test_the_registry_names_every_method_and_the_tables_in_row_order():
    assert list(METHODS) == ["rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft", "fp-finetune", "llm-qat",
                             "rtn+lorc", "qaft+lorc"]
    assert QUANT_TABLE_METHODS == ("rtn", "gptq", "gptq-noact", "gptq+lorc", "qaft", "fp-finetune")
    assert all(name == m.name and m.label and m.description for name, m in METHODS.items())
    assert {n for n, m in METHODS.items() if m.seeded} == {"qaft", "fp-finetune", "llm-qat", "qaft+lorc"}
    assert METHODS["llm-qat"].finetune_defaults.distill_weight == 1.0
    assert METHODS["qaft"].finetune_defaults == FinetuneSettings()
    assert METHODS["gptq"].finetune_defaults is None


def test_every_method_runs_what_the_library_computes(setting):
    base, calib = setting
    job = QuantJob(base, calib, "int3", layers="*.mlp.*", gptq=GPTQSettings(block_size=8), finetune=SETTINGS,
                   lorc_rank=2, batch_size=4, progress=False)
    gptq_result = gptq(base, calib, "int3", GPTQSettings(block_size=8), layers="*.mlp.*", batch_size=4,
                       progress=False)
    qaft_result = qaft(base, calib, "int3", SETTINGS, layers="*.mlp.*", progress=False)
    rtn_result = rtn(base, "int3", "*.mlp.*", calib, batch_size=4)
    expected = {
        "rtn": rtn_result,
        "gptq": gptq_result,
        "gptq-noact": gptq(base, calib, "int3", GPTQSettings(block_size=8, act_order=False), layers="*.mlp.*",
                           batch_size=4, progress=False),
        "gptq+lorc": lorc(base, gptq_result, 2, calib=calib, batch_size=4, progress=False),
        "qaft": qaft_result,
        "fp-finetune": fp_finetune(base, calib, "int3", SETTINGS, layers="*.mlp.*", progress=False),
        "llm-qat": llm_qat(base, "int3", SETTINGS, GenerationSettings(16, 8), layers="*.mlp.*",
                           progress=False),
        "rtn+lorc": lorc(base, rtn_result, 2, calib=calib, batch_size=4, progress=False),
        "qaft+lorc": lorc(base, qaft_result, 2, calib=calib, batch_size=4, progress=False),
    }
    assert set(expected) == set(METHODS)
    for name, want in expected.items():
        got = run_method(name, job)
        assert same_weights(got, want), name
        assert got.method == want.method and got.settings == want.settings, name
        assert got.base_model == "tiny-gpt2" and got.base_fingerprint == want.base_fingerprint, name
    assert run_method("gptq-noact", job).settings["act_order"] is False


def test_the_control_with_the_qaft_runs_settings_is_its_paired_control_bit_for_bit(setting):
    """What lets the quantization table run ``fp-finetune`` from the protocol's settings instead of pairing it
    with a finished QAFT run: the same FinetuneSettings and layers give the same weights."""
    base, calib = setting
    for settings in (SETTINGS, FinetuneSettings(lr=1e-3, epochs=1.0, batch_size=4, seed=0, warmup_steps=1)):
        run = qaft(base, calib, "int4", settings, progress=False)
        control = run_method("fp-finetune", QuantJob(base, calib, "int4", finetune=settings, progress=False))
        assert same_weights(control, paired_control(base, calib, run, progress=False))
        assert control.format is None and control.settings["quantize"] is False
        w0 = {n: base.model.get_submodule(n).weight.T for n in control.weights}  # Conv1D stores (in, out)
        assert any(not torch.equal(w, w0[n]) for n, w in control.weights.items())


def test_a_method_built_on_another_takes_its_result_from_the_job(setting):
    base, calib = setting
    asked = []
    saved = gptq(base, calib, "int3", progress=False)

    def results(method):
        asked.append(method)
        return saved

    job = QuantJob(base, calib, "int3", lorc_rank=2, measure_layer_mse=False, progress=False, results=results)
    got = run_method("gptq+lorc", job)
    assert asked == ["gptq"] and same_weights(got, lorc(base, saved, 2, progress=False))
    assert got.layer_mse == {}
    assert run_method("rtn", job).layer_mse == {} and run_method("rtn", job).calibration == {}


def test_the_learning_rate_sweep_of_a_job_is_chosen_on_the_calibration_split(setting):
    base, calib = setting
    search = LearningRateSweepSettings(candidates=(1e-3, 1e-2), n_validation=2)
    settings = FinetuneSettings(steps=2, batch_size=2)
    job = QuantJob(base, calib, "int3", finetune=settings, lr_sweep=search, progress=False)
    got = run_method("qaft", job)
    sweep = select_learning_rate(base, calib, "int3", settings, search, progress=False)
    assert got.extra["lr_selection"] == sweep.to_dict() | {"seconds": got.extra["lr_selection"]["seconds"]}
    assert same_weights(got, qaft(base, calib, "int3", replace(settings, lr=sweep), progress=False))
    control = run_method("fp-finetune", job)
    assert control.extra["lr_selection"]["method"] == "fp-finetune" and control.format is None
    with pytest.raises(QAFTError, match="not available for llm-qat"):
        run_method("llm-qat", job)


def test_unknown_methods_and_bad_jobs_are_refused(setting):
    base, calib = setting
    with pytest.raises(UnknownMethodError, match="unknown method 'awq'; valid: rtn, gptq"):
        run_method("awq", QuantJob(base, calib, "int4"))
    with pytest.raises(TypeError, match="Base"):
        QuantJob(base.model, calib, "int4")
    with pytest.raises(ValueError, match="got 9"):
        QuantJob(base, calib, "int9")


def test_a_loaded_model_has_one_base_labelled_with_its_name():
    model = tiny_model("gpt2")
    info = ModelInfo("tiny-gpt2", "test", "gpt2", 0, 64, "float32")
    lm = LoadedModel(model, None, info)
    assert lm.base is lm.base and lm.base.model is model and lm.base.label == "tiny-gpt2"
    assert lm.base.fingerprint() == weights_fingerprint(model)
    assert rtn(lm.base, "int4").base_model == "tiny-gpt2"
    assert rtn(model, "int4").base_model == "GPT2LMHeadModel"
