"""landscape: measure the loss landscape around pretrained LLM weights to explain why low-precision
post-training quantization fails where quantization-aware fine-tuning succeeds.

The package is built in floors; a module imports only from floors below it (``tests/test_layout.py`` checks
that the import graph has no cycle):

1. **Foundations**, importing nothing of landscape: ``version``, ``cache`` (where built things live),
   ``outputs`` (writable output paths), ``stats`` (bootstrap intervals, rank correlations, control-adjusted
   gaps), ``figio`` (writing Plotly pages), ``weights`` (layers addressed and selected by name, ``(out, in)``
   views, swaps that restore w0 bit-exactly, the fingerprint of w0, and :class:`~landscape.weights.Base`: the
   model a measurement is made around, made once and passed on).
2. **Text and objectives**: ``data`` (corpora, token sets, calibration and held-out splits), ``objectives``
   (the token-mean NLL with its convention, each layer's output MSE), then ``store`` (HDF5 result stores: one
   writer, :class:`~landscape.store.StoreRecord` as the one serialised form, the ``provenance`` helper).
3. **Models**: ``refmodel`` (reference models trained here), ``models`` (loading by name, hub id or path).
4. **Methods and measurements**, side by side: ``quant/`` (formats and grids, RTN, GPTQ, QAFT and its control,
   LoRC, activation quantization, LLM-QAT, saved results, and ``methods``: the one registry of methods);
   ``engine/`` (directions, perturbation scans, the basin radius, and how a sweep executes); ``curvature/``
   (Hessian and Gauss-Newton spectra, traces, densities and curvature along directions, over
   hessian-eigenthings).
5. **Studies**: ``studies/`` (the methods x formats table, the displacement comparison, the misalignment
   candidates and their correlations, the PTQ-difficulty predictor).
6. ``plots`` (figures from stores only), then ``cli/`` (the ``landscape`` command: one parser, shared argument
   groups, an explicit list of command modules; thin entry points over the library).

Above the package, ``analyses/`` composes these into the headline figures and the study scripts.

The names of the README's library example are importable from here.
"""

import importlib

from landscape.version import __version__

# Imported on first use (PEP 562), so that ``import landscape`` (and the command's entry point,
# landscape.start, which guards the heavy imports against Ctrl-C) does not load torch and transformers.
_EXPORTS = {"calibration_set": "landscape.data", "heldout_set": "landscape.data",
            "basin_radius": "landscape.engine.basin", "cosine": "landscape.engine.directions",
            "displacement_direction": "landscape.engine.directions",
            "random_direction": "landscape.engine.directions", "load_model": "landscape.models",
            "layer_mse": "landscape.objectives", "nll": "landscape.objectives", "gptq": "landscape.quant",
            "qaft": "landscape.quant", "rtn": "landscape.quant", "Base": "landscape.weights"}

__all__ = ["Base", "__version__", "basin_radius", "calibration_set", "cosine", "displacement_direction",
           "gptq", "heldout_set", "layer_mse", "load_model", "nll", "qaft", "random_direction", "rtn"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
