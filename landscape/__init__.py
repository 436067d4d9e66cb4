"""landscape: measure the loss landscape around pretrained LLM weights to explain why low-precision
post-training quantization fails where quantization-aware fine-tuning succeeds.

Library entry points (each documented in its module):

* :func:`landscape.models.load_model`, :func:`landscape.models.quantizable_layers`
* :func:`landscape.data.calibration_set`, :func:`landscape.data.heldout_set`
* :func:`landscape.objectives.nll`, :func:`landscape.objectives.layer_mse`
"""

from landscape.data import calibration_set, heldout_set
from landscape.engine.basin import basin_radius
from landscape.engine.directions import cosine, displacement_direction, random_direction
from landscape.models import load_model
from landscape.objectives import layer_mse, nll
from landscape.quant import gptq, qaft, rtn
from landscape.version import __version__
from landscape.weights import Base

__all__ = ["Base", "__version__", "basin_radius", "calibration_set", "cosine", "displacement_direction", "gptq",
           "heldout_set", "layer_mse", "load_model", "nll", "qaft", "random_direction", "rtn"]
