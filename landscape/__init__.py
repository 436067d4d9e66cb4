"""landscape: measure the loss landscape around pretrained LLM weights to explain why low-precision
post-training quantization fails where quantization-aware fine-tuning succeeds.

Library entry points (each documented in its module):

* :func:`landscape.models.load_model`, :func:`landscape.models.quantizable_layers`
* :func:`landscape.data.calibration_set`, :func:`landscape.data.heldout_set`
* :func:`landscape.objectives.nll`, :func:`landscape.objectives.layer_mse`
"""

__version__ = "0.1.0"
