"""The weights a study is about: layers addressed by module name, chosen by glob, read as ``(out, in)``
matrices, swapped and restored bit-exactly, and identified by a fingerprint of w0.

* **Layers** are named by module name (``transformer.h.0.attn.c_attn``, ``model.layers.3.mlp.up_proj``). The
  quantizable layers (:func:`quantizable_layers`) are the linear layers (``nn.Linear``, GPT-2's ``Conv1D``)
  inside the decoder blocks of a transformers model, in forward order; of any other module, its linear layers.
* **One selector.** :func:`select_layers` turns ``None`` (all), a glob, comma-separated globs or a sequence of
  globs into layer names in forward order; a glob that matches no quantizable layer is a
  :class:`LayerSelectionError` naming it. Quantizers, directions and curvature all select through it.
* **Orientation.** A weight is always handled as ``(out_features, in_features)`` (:func:`weight_matrix`),
  whatever the module stores (GPT-2's ``Conv1D`` stores ``(in, out)``).
* **The base.** A :class:`Base` is the pretrained model a measurement is made around: the module, its name for
  provenance (:func:`model_label`) and the fingerprints of w0 (:func:`weights_fingerprint`), each computed
  once.

This module imports nothing else of landscape: every floor above it addresses weights through it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ALL_LAYERS: tuple[str, ...] = ("*",)
LayerSelection = str | Sequence[str] | None


class LayerSelectionError(ValueError, KeyError):
    """A layer name or glob that names no quantizable layer of the model (also a ``KeyError``: a missing
    key)."""

    __str__ = Exception.__str__  # KeyError would quote the message


LOW_PRECISION = (torch.bfloat16, torch.float16)
ROW_BLOCK_ELEMENTS = 1 << 20  # what one pass over a layer's weight works on at a time (4 MB in float32)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype landscape computes in for weights of ``dtype``: float32 for bfloat16 and float16
    (perturbations, grids, NLL sums and training updates are formed there and rounded to the model's dtype
    once), else ``dtype`` itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


# ------------------------------------------------------------------------------------------ addressing
def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer storing its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def decoder_blocks_prefix(model: nn.Module) -> str:
    """Module name of the ``nn.ModuleList`` holding the decoder blocks (``transformer.h``,
    ``model.layers``...)."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0:
            return name
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} "
                     f"(expected a ModuleList of {n_layers})")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (see :func:`decoder_blocks_prefix`)."""
    return model.get_submodule(decoder_blocks_prefix(model))


def quantizable_layers(model: nn.Module, include_embeddings: bool = False,
                       include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Linear layers (``nn.Linear``, GPT-2 ``Conv1D``) inside the decoder blocks, in forward order; for a
    module that is not a transformers model (no ``config``), every named linear layer.

    Embeddings and the LM head are excluded unless asked for (they are often tied to each other).
    """
    if getattr(model, "config", None) is None:
        return {n: m for n, m in model.named_modules() if n and is_linear(m)}
    prefix = decoder_blocks_prefix(model) + "."
    layers = {n: m for n, m in model.named_modules() if n.startswith(prefix) and is_linear(m)}
    if include_embeddings:
        emb = model.get_input_embeddings()
        layers = {next(n for n, m in model.named_modules() if m is emb): emb, **layers}
    if include_lm_head:
        head = model.get_output_embeddings()
        if head is not None:
            layers[next(n for n, m in model.named_modules() if m is head)] = head
    return layers


def layer_patterns(layers: LayerSelection) -> tuple[str, ...]:
    """The globs of a selection: ``None`` is every layer (``("*",)``); a string is one glob or comma-separated
    globs; a sequence holds globs."""
    if layers is None:
        return ALL_LAYERS
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    if not all(isinstance(p, str) for p in items):
        raise LayerSelectionError(f"layers must be None, a glob, comma-separated globs or a sequence of "
                                  f"globs; got {layers!r}")
    patterns = tuple(p.strip() for p in items if p.strip())
    if not patterns:
        raise LayerSelectionError(f"layers must name at least one glob (None for every quantizable layer), "
                                  f"got {layers!r}")
    return patterns


def select_layers(model: nn.Module, layers: LayerSelection = None) -> list[str]:
    """Names of the quantizable layers matching any glob of ``layers``, in forward order.

    Raises:
        LayerSelectionError: a glob that matches no quantizable layer (the message names it and valid names).
    """
    available = list(quantizable_layers(model))
    patterns = layer_patterns(layers)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [name for name in available if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            example = f"; globs such as '{available[0].rsplit('.', 1)[0]}.*' work" if available else ""
            raise LayerSelectionError(f"unknown layer {pattern!r}: it matches no quantizable layer of this "
                                      f"model ({len(available)} in all, e.g. {available[:3]}){example}")
        chosen.update(hits)
    return [name for name in available if name in chosen]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; a :class:`LayerSelectionError` listing a few valid names otherwise."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        try:
            valid = list(quantizable_layers(model))
        except (AttributeError, ValueError):  # a transformers config without decoder blocks we recognise
            valid = [n for n, m in model.named_modules() if is_linear(m)]
        raise LayerSelectionError(f"unknown layer {name!r}; valid layers are e.g. {valid[:4]} ... "
                                  f"({len(valid)} in all)") from None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as an ``(out_features, in_features)`` view (writes go to the parameter).

    GPT-2's ``Conv1D`` stores ``(in, out)``; its transpose view is returned. Embeddings are
    ``(vocab, hidden)``: each vocabulary row is treated as an output channel.
    """
    if weight_is_transposed(module):
        return module.weight.T
    return module.weight


def weight_is_transposed(module: nn.Module) -> bool:
    """True if the module stores its weight as ``(in, out)`` (GPT-2 ``Conv1D``), so that
    :func:`weight_matrix` is the transpose of the parameter."""
    return type(module).__name__ == "Conv1D"


def parameter_layout(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` matrix in the layout of ``module.weight``: the inverse of :func:`weight_matrix`."""
    return w.T if weight_is_transposed(module) else w


def weight_param_name(layer_name: str) -> str:
    """Parameter name of a layer's weight (``layer.weight``)."""
    return f"{layer_name}.weight"


def layer_weights(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached copies of the ``(out, in)`` weights of the named (default: all quantizable) layers."""
    names = list(quantizable_layers(model)) if names is None else names
    return {n: weight_matrix(get_layer(model, n)).detach().clone() for n in names}


def weights_norm(model: nn.Module, names: Sequence[str]) -> float:
    """Euclidean norm ``||w0||`` of the named layers' ``(out, in)`` weights (float64): the unit of relative
    radii. Squares are summed in float64 a block of rows at a time (:func:`row_blocks`), so a wide layer
    costs a block's float64 copy, not its own."""
    return math.sqrt(sum(float(block.double().pow(2).sum())
                         for n in names for block in row_blocks(weight_matrix(get_layer(model, n)).detach())))


def row_blocks(w: torch.Tensor, elements: int | None = None) -> tuple[torch.Tensor, ...]:
    """``w`` (out, in) as consecutive views of whole rows, each at most ``elements`` elements (default
    :data:`ROW_BLOCK_ELEMENTS`) unless that is less than the fewest rows that make a multiple of 64 elements;
    a layer no larger than ``elements`` is one block, ``w`` itself.

    For passes that make float32 or float64 temporaries of a layer (a norm, a hash, a perturbed point): one
    block's temporaries instead of the layer's (a 2048 x 8192 layer's float64 copy is 134 MB). A layer no
    larger than a block is passed whole, so its results are bit for bit those of a whole-layer pass (every
    layer of SmolLM2-135M is); the blocks of a larger one hold multiples of 64 elements (whole vector
    registers).
    """
    elements = ROW_BLOCK_ELEMENTS if elements is None else elements
    if w.numel() <= elements:
        return (w,)
    cols = max(1, w.shape[-1])
    align = 64 // math.gcd(cols, 64)  # rows per block: a multiple of this keeps blocks 64-element aligned
    rows = max(align, elements // cols // align * align)
    return w.split(rows)


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily let named layers compute with other ``(out, in)`` weights; w0 is back bit-exactly on exit.

    Each layer's weight parameter is pointed at the given tensor (in the parameter's layout, dtype and
    device: a tensor that already has them is used as it is, not copied) and pointed back at w0's own
    storage on exit, also when the body raises. So no copy of w0 is made: swapping in a quantized model
    costs nothing beside the model and the given weights (SmolLM2's 210 layers: 0.42 GB less than copying w0
    aside), and views of w0 taken before the swap keep reading w0. In-place writes to a swapped layer's
    weight inside the context go to the given tensor.
    """
    swapped: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its w0 storage), in swap order
    try:
        with torch.no_grad():
            for name, w in weights.items():
                module = get_layer(model, name)
                param = module.weight
                expected = tuple(weight_matrix(module).shape)
                if tuple(w.shape) != expected:
                    raise ValueError(f"weight for {name!r} has shape {tuple(w.shape)}, layer expects "
                                     f"{expected}")
                installed = parameter_layout(module, w.detach().to(device=param.device, dtype=param.dtype))
                swapped.append((param, param.data))
                param.data = installed
        yield model
    finally:
        for param, w0 in reversed(swapped):  # reversed: a parameter swapped twice (tied) ends at its w0
            param.data = w0


@contextlib.contextmanager
def restored_on_exit(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield copies of the named layers' ``(out, in)`` weights (w0); write them back bit-exactly on exit,
    also when the body raises (for solvers that install weights as they go, like sequential GPTQ)."""
    saved = layer_weights(model, list(names))
    try:
        yield saved
    finally:
        with torch.no_grad():
            for n, w0 in saved.items():
                weight_matrix(get_layer(model, n)).copy_(w0)


# ----------------------------------------------------------------------------------------- identity
def weights_fingerprint(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """sha256 (16 hex) of the named (default: all quantizable) layers' ``(out, in)`` weights as float32:
    identifies the base w0 of a quantized model or a direction. Hashes a block of rows at a time
    (:func:`row_blocks`: the same bytes in the same order as the whole layer's), never a copy of the model or
    of a wide layer."""
    h = hashlib.sha256()
    for name in quantizable_layers(model) if names is None else names:
        w = weight_matrix(get_layer(model, name)).detach()
        h.update(name.encode())
        for block in row_blocks(w):
            h.update(block.to(device="cpu", dtype=torch.float32).contiguous().numpy())
    return h.hexdigest()[:16]


def model_label(model: nn.Module, name: str | None = "") -> str:
    """The model's name for provenance: ``name`` if given, else its ``config.name_or_path``, else its class
    name."""
    return name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__


@dataclass
class Base:
    """The pretrained model w0 a measurement is made around: its module, its name, and the fingerprints of w0.

    Made once per run and passed on, so the fingerprint of a layer set is hashed once, not at every check.
    It is valid while ``model`` holds w0, which every landscape function guarantees on return (weights moved
    during a measurement are restored bit-exactly).
    """

    model: nn.Module
    label: str = ""
    _fingerprints: dict[tuple[str, ...], str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.label = model_label(self.model, self.label)

    @property
    def layers(self) -> list[str]:
        """Every quantizable layer, in forward order."""
        return list(quantizable_layers(self.model))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (of its first one)."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters (of its first one)."""
        return next(self.model.parameters()).device

    def fingerprint(self, names: Sequence[str] | None = None) -> str:
        """:func:`weights_fingerprint` of w0 on ``names`` (default: every quantizable layer), hashed once."""
        key = tuple(self.layers if names is None else names)
        if key not in self._fingerprints:
            self._fingerprints[key] = weights_fingerprint(self.model, key)
        return self._fingerprints[key]


def as_base(model: nn.Module | Base, name: str | None = "") -> Base:
    """``model`` itself if it is a :class:`Base`, else a new Base of the module (labelled ``name``)."""
    if isinstance(model, Base):
        return model
    return Base(model, name or "")
