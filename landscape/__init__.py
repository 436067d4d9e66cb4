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

from landscape.data import calibration_set, heldout_set
from landscape.engine.basin import basin_radius
from landscape.engine.directions import cosine, displacement_direction, random_direction
from landscape.models import load_model
from landscape.objectives import layer_mse, nll
from landscape.quant import gptq, qaft, rtn
from landscape.version import __version__
from landscape.weights import Base

__all__ = ["Base", "__version__", "basin_radius", "calibration_set", "cosine", "displacement_direction",
           "gptq", "heldout_set", "layer_mse", "load_model", "nll", "qaft", "random_direction", "rtn"]
