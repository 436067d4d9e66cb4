"""Activation and KV-cache fake quantization, so W4A8, W8A8 and W4A8KV4 settings can be evaluated and trained.

Weights are quantized by the solvers (RTN, GPTQ, QAFT) onto a static grid computed from w0; activations
cannot be, because they change with every input. Here they are quantized **dynamically**: each forward
pass computes a min-max range from the tensor it is about to round, with the same lattice rule as the
weights (:func:`landscape.quant.formats.make_grid`), so ``int8`` means the same code range everywhere.

Two places are quantized, both by forward hooks installed on modules **by name** (never by relying on a
transformers forward signature), and removed on exit:

* **activations**: the input ``x`` of every quantized linear layer (``nn.Linear`` or GPT-2 ``Conv1D``)
  is replaced by ``fake_quant(x)`` before the layer multiplies it.
* **keys and values**: the outputs of the key and value projections are replaced by their fake-quantized
  values, so attention reads a quantized KV cache. OPT and Llama have ``k_proj`` / ``v_proj`` modules;
  GPT-2 has one ``c_attn`` (``Conv1D``) whose output ``(b, t, 3E)`` is ``[q | k | v]``: only the k and v
  slices are quantized, q is left as it is. **Convention**: in Llama the rotary embedding is applied
  *after* ``k_proj``, so keys are quantized before rotation (the cache of an inference engine holds
  rotated keys; per-token ranges of the two differ slightly).

Granularity (:class:`ActivationQuant`):

* ``"token"`` (default): one range per token, i.e. per row of the ``(tokens, features)`` matrix (LLM-QAT,
  ZeroQuant). The result for one token depends on nothing else in the batch.
* ``"tensor"``: one range for the whole tensor of one forward call (all tokens of the batch), so the
  value of one token depends on the rest of the batch.

Gradients pass straight through the rounding (STE), and the ranges are treated as constants, so the
hooks can stay installed while a model is fine-tuned (see ``activations=`` in
:func:`landscape.quant.qaft.qaft`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from landscape.quant.formats import MAX_BITS, MIN_BITS, QuantFormat, make_grid, parse_format
from landscape.weights import get_layer, quantizable_layers, weight_matrix

ActivationGranularity = Literal["token", "tensor"]
ACTIVATION_GRANULARITIES = ("token", "tensor")


class ActivationQuantError(ValueError):
    """An invalid activation / KV quantization setting, or a model whose projections cannot be found."""


@dataclass(frozen=True)
class ActivationQuant:
    """How activations (or keys and values) are fake-quantized: ``bits`` and one min-max range per token or
    tensor.

    ``symmetric=False`` (default) uses a zero point (codes ``0 .. 2^bits - 1``), which suits the mostly
    positive inputs of MLP down-projections; ``symmetric=True`` uses codes ``-(2^(bits-1) - 1) ..
    2^(bits-1) - 1`` and no zero point (LLM-QAT's choice).
    """

    bits: int
    granularity: ActivationGranularity = "token"
    symmetric: bool = False

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ActivationQuantError(
                f"activation bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.granularity not in ACTIVATION_GRANULARITIES:
            raise ActivationQuantError(
                f"activation granularity must be one of {ACTIVATION_GRANULARITIES}, got {self.granularity!r}")

    @property
    def name(self) -> str:
        """Short label, e.g. ``a8`` (per-token asymmetric), ``a8-tensor-sym``."""
        suffix = "" if self.granularity == "token" else f"-{self.granularity}"
        return f"a{self.bits}{suffix}{'-sym' if self.symmetric else ''}"

    @property
    def format(self) -> QuantFormat:
        """The weight-format equivalent: rows of a ``(tokens, features)`` matrix play the role of channels."""
        return QuantFormat(self.bits, self.symmetric, "channel" if self.granularity == "token" else "tensor")


def as_activation_quant(spec: ActivationQuant | int | None) -> ActivationQuant | None:
    """``None`` stays ``None``; an ``int`` is read as per-token asymmetric fake quantization with that many
    bits."""
    if spec is None or isinstance(spec, ActivationQuant):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return ActivationQuant(spec)
    raise ActivationQuantError(f"activation quantization must be an ActivationQuant, an integer bit width in "
                               f"{MIN_BITS}..{MAX_BITS}, or None; got {spec!r}")


def fake_quant_activations(x: torch.Tensor, spec: ActivationQuant) -> torch.Tensor:
    """Dynamic min-max fake quantization of ``x`` (``(..., features)``), straight-through gradient.

    Per token: every ``x[..., :]`` row gets its own scale (asymmetric: ``(max(x, 0) - min(x, 0)) / (2^b - 1)``
    and zero point ``round(-min(x, 0) / scale)``; symmetric: ``max |x| / (2^(b-1) - 1)``). Per tensor: one
    range over all of ``x``. Same dtype and shape as ``x``.
    """
    rows = x.reshape(-1, x.shape[-1])  # (tokens, features)
    grid = make_grid(rows, spec.format, name="activations")
    return grid.fake_quant(rows).reshape(x.shape)


# ------------------------------------------------------------------------------------- key/value taps
@dataclass(frozen=True)
class KVProjection:
    """A module whose output carries keys and/or values: ``slices`` maps ``"k"``/``"v"`` to output columns."""

    module_name: str
    slices: tuple[tuple[str, int, int], ...]  # (kind, start, stop) along the output's last dimension


def kv_projections(model: nn.Module) -> list[KVProjection]:
    """The key and value projections of every decoder block, found by module name.

    ``*.k_proj`` / ``*.v_proj`` (OPT, Llama, Mistral...) quantize their whole output; GPT-2's ``*.c_attn``
    (output ``[q | k | v]``, each ``E = out / 3`` wide) quantizes columns ``E:2E`` and ``2E:3E``.
    """
    found: list[KVProjection] = []
    for name, module in quantizable_layers(model).items():
        leaf = name.rsplit(".", 1)[-1]
        out_features = weight_matrix(module).shape[0]
        if leaf in ("k_proj", "v_proj"):
            found.append(KVProjection(name, ((leaf[0], 0, out_features),)))
        elif leaf == "c_attn":
            e = out_features // 3
            found.append(KVProjection(name, (("k", e, 2 * e), ("v", 2 * e, 3 * e))))
    if not found:
        raise ActivationQuantError(
            f"KV quantization: no key/value projections found in {type(model).__name__}; accepted module "
            f"names end in 'k_proj'/'v_proj' (OPT, Llama) or 'c_attn' (GPT-2)")
    return found


# ----------------------------------------------------------------------------------- the context manager
@contextlib.contextmanager
def quantized_activations(
    model: nn.Module,
    activations: ActivationQuant | int | None = None,
    kv: ActivationQuant | int | None = None,
    layers: Sequence[str] | None = None,
) -> Iterator[nn.Module]:
    """Fake-quantize linear-layer inputs and/or keys and values while the ``with`` block runs.

    Args:
        model: a causal LM (its weights are not touched; only hooks are added, and removed on exit).
        activations: quantization of the inputs of the linear layers in ``layers`` (``None``: off).
        kv: quantization of the key and value projections' outputs (``None``: off).
        layers: which linear layers get quantized inputs (default: every quantizable decoder linear).

    Example::

        with quantized_activations(model, ActivationQuant(8), kv=ActivationQuant(4)):
            nll(model, data)
    evaluates W?A8KV4 on top of whatever weights the model holds.
    """
    activations, kv = as_activation_quant(activations), as_activation_quant(kv)
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    targets = {n: get_layer(model, n) for n in names} if activations is not None else {}
    projections = kv_projections(model) if kv is not None else []

    def quantize_input(layer_name: str):
        def pre_hook(module, args):
            if not args:
                raise ActivationQuantError(f"{layer_name}: called without a positional input; cannot "
                                           f"quantize it")
            return (fake_quant_activations(args[0], activations), *args[1:])

        return pre_hook

    def quantize_kv(projection: KVProjection):
        def hook(module, args, output):
            parts, start = [], 0
            for _, lo, hi in projection.slices:
                parts += [output[..., start:lo], fake_quant_activations(output[..., lo:hi], kv)]
                start = hi
            parts.append(output[..., start:])
            return torch.cat(parts, dim=-1)

        return hook

    handles = []
    try:
        for name, module in targets.items():
            handles.append(module.register_forward_pre_hook(quantize_input(name)))
        for projection in projections:
            module = get_layer(model, projection.module_name)
            handles.append(module.register_forward_hook(quantize_kv(projection)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------ W4A8KV4 settings
@dataclass(frozen=True)
class BitSetting:
    """A mixed setting such as W4A8KV4: the weight format and the activation / KV quantization (``None``:
    full precision)."""

    weights: QuantFormat | None
    activations: ActivationQuant | None
    kv: ActivationQuant | None

    @property
    def name(self) -> str:
        parts = [f"W{self.weights.bits}" if self.weights else "W16"]
        parts.append(f"A{self.activations.bits}" if self.activations else "A16")
        if self.kv is not None:
            parts.append(f"KV{self.kv.bits}")
        return "".join(parts)


_SETTING_RE = re.compile(r"^w(?P<w>\d+)a(?P<a>\d+)(?:kv(?P<kv>\d+))?$")


def parse_bit_setting(
    spec: str,
    weight_format: str = "int{bits}",
    granularity: ActivationGranularity = "token",
    symmetric: bool = False,
) -> BitSetting:
    """Parse ``W4A8``, ``W8A8``, ``W4A8KV4`` (case-insensitive); 16 bits means "not quantized".

    Args:
        weight_format: the weight format name with ``{bits}`` in it (default ``int{bits}``: per-channel
            asymmetric; e.g. ``int{bits}-g64-sym``).
        granularity, symmetric: of the activation and KV quantization.
    """
    m = _SETTING_RE.match(spec.strip().lower().replace("-", ""))
    if not m:
        raise ActivationQuantError(f"unknown bit setting {spec!r}; accepted: W<b>A<b>[KV<b>] such as W4A8, "
                                   f"W8A8, W4A8KV4, with each b in {MIN_BITS}..{MAX_BITS} or 16 "
                                   f"(not quantized)")

    def bits(group: str | None) -> int | None:
        return None if group is None or int(group) == 16 else int(group)

    w, a, k = bits(m["w"]), bits(m["a"]), bits(m["kv"])
    return BitSetting(
        weights=None if w is None else parse_format(weight_format.format(bits=w)),
        activations=None if a is None else ActivationQuant(a, granularity, symmetric),
        kv=None if k is None else ActivationQuant(k, granularity, symmetric),
    )
