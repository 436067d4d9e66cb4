"""GPTQ-packed checkpoints (AutoGPTQ / GPTQModel / transformers' ``quant_method: gptq``), read with an
unpacker of our own from the safetensors, no GPTQ package needed.

Each quantized linear ``P`` of an ``(out, in)`` weight is stored as

* ``P.qweight``: int32 ``(in * bits / 32, out)``, the codes ``q`` packed along the *input* dimension;
* ``P.qzeros``: int32 ``(n_groups, out * bits / 32)``, the zero points packed along the *output* dimension;
* ``P.scales``: float ``(n_groups, out)``;
* ``P.g_idx`` (optional): int32 ``(in,)``, the group of each input column (act-order checkpoints permute it;
  absent: ``i // group_size``);

and dequantizes to ``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``. Codes are
packed as one little-endian bit stream per column: value ``k`` occupies bits ``k * bits .. k * bits + bits -
1`` of the concatenated 32-bit words, which for 2, 4 and 8 bits is ``32 / bits`` values per word and for 3
bits is AutoGPTQ's 32 values in 3 words (values straddle words). **Zero points**: the ``gptq`` (v1)
checkpoint format stores ``zero - 1``, the ``gptq_v2`` format stores ``zero``
(``quantization_config.checkpoint_format``; v1 when absent). A v1 field at the top code (``2**bits - 1``) is
read as ``2**bits``, the value v1 kernels compute from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

PACKED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 2}  # quantization_config.checkpoint_format -> zero convention
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


class CheckpointError(ValueError):
    """A checkpoint that cannot be imported: unknown packing, missing tensors, another base model."""


@dataclass(frozen=True)
class GPTQPackedConfig:
    """A checkpoint's ``quantization_config`` (the keys that define its lattice)."""

    bits: int
    group_size: int  # -1: one group per output channel
    sym: bool
    desc_act: bool
    checkpoint_format: str  # "gptq" (v1: zero - 1 stored) or "gptq_v2"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str) -> GPTQPackedConfig:
        """Validated from ``config.json``'s ``quantization_config``; a :class:`CheckpointError` names the bad
        key and what is accepted."""
        method = config.get("quant_method")
        if method != "gptq":
            raise CheckpointError(f"{where}: quant_method {method!r} is not a GPTQ-packed checkpoint "
                                  f"(accepted: 'gptq')")
        bits, group = config.get("bits"), config.get("group_size", -1)
        if bits not in PACKED_BITS:
            raise CheckpointError(f"{where}: bits {bits!r} has no GPTQ packing this importer reads; "
                                  f"accepted: {PACKED_BITS}")
        if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group >= 1):
            raise CheckpointError(f"{where}: group_size {group!r}; accepted: -1 (per channel) or a positive "
                                  f"integer")
        packing = config.get("checkpoint_format", "gptq")
        if packing not in CHECKPOINT_FORMATS:
            raise CheckpointError(f"{where}: checkpoint_format {packing!r} is a packing this importer does "
                                  f"not read (kernel-specific layouts such as marlin are repacked for one "
                                  f"kernel); accepted: {sorted(CHECKPOINT_FORMATS)}")
        return cls(bits, group, bool(config.get("sym", True)), bool(config.get("desc_act", False)), packing)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- unpacking
def unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit values of each column of int32 ``packed`` ``(words, columns)``, read
    as one little-endian bit stream per column: an int64 ``(count, columns)`` tensor of codes in
    ``0 .. 2**bits - 1``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise CheckpointError(f"packed codes must be a 2-D int32 tensor, got {packed.dtype} "
                              f"{tuple(packed.shape)}")
    words, columns = packed.shape
    if words * 32 < count * bits:
        raise CheckpointError(f"{words} packed words per column hold {words * 32 // bits} {bits}-bit values, "
                              f"fewer than the {count} the layer needs")
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:  # whole values per word: shift and mask
        shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
        values = (unsigned.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
        return values.reshape(words * (32 // bits), columns)[:count]
    bit_index = torch.arange(32, dtype=torch.int64, device=packed.device)
    stream = ((unsigned.unsqueeze(1) >> bit_index.view(1, -1, 1)) & 1).to(torch.uint8)
    stream = stream.reshape(words * 32, columns)[:count * bits].reshape(count, bits, columns)
    weights = (1 << torch.arange(bits, dtype=torch.int64, device=packed.device)).view(1, bits, 1)
    return (stream.to(torch.int64) * weights).sum(dim=1)


def dequantize(tensors: Mapping[str, torch.Tensor], cfg: GPTQPackedConfig, in_features: int,
               name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``(out, in)`` float32 weight of one packed layer (``tensors``: its ``qweight``, ``qzeros``,
    ``scales`` and optional ``g_idx``) and what was read of its lattice (groups, top-code v1 zeros)."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise CheckpointError(f"layer {name!r} lacks {missing}; a GPTQ-packed layer has qweight, qzeros, "
                              f"scales (and optionally g_idx)")
    scales = tensors["scales"].to(torch.float32)
    n_groups, out_features = scales.shape
    codes = unpack_rows(tensors["qweight"], cfg.bits, in_features)  # (in, out)
    if codes.shape[1] != out_features:
        raise CheckpointError(f"layer {name!r}: qweight has {codes.shape[1]} output columns, scales "
                              f"{out_features}")
    zeros = unpack_rows(tensors["qzeros"].t().contiguous(), cfg.bits, out_features).t()  # (groups, out)
    if zeros.shape[0] != n_groups:
        raise CheckpointError(f"layer {name!r}: qzeros has {zeros.shape[0]} groups, scales {n_groups}")
    top_code_zeros = 0
    if CHECKPOINT_FORMATS[cfg.checkpoint_format] == 1:
        top_code_zeros = int((zeros == (1 << cfg.bits) - 1).sum())
        zeros = zeros + 1
    if "g_idx" in tensors:
        g_idx = tensors["g_idx"].to(torch.int64)
    else:
        size = in_features if cfg.group_size == -1 else cfg.group_size
        g_idx = torch.arange(in_features) // size
    if g_idx.shape != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise CheckpointError(f"layer {name!r}: g_idx must give each of its {in_features} input columns a "
                              f"group in 0..{n_groups - 1}")
    weight = scales[g_idx] * (codes - zeros[g_idx]).to(torch.float32)  # (in, out)
    return weight.t().contiguous(), {"groups": n_groups, "v1_top_code_zeros": top_code_zeros}


# ----------------------------------------------------------------------------------------------- files
def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory (with its ``quantization_config``)."""
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json; a quantized checkpoint directory holds "
                              f"config.json (with quantization_config) and safetensors weights") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}") from None


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's ``*.safetensors`` files (a sharded checkpoint's shards together)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors files (pickled .bin checkpoints are not "
                              f"read: convert them with save_pretrained(safe_serialization=True))")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in tensors:
                        raise CheckpointError(f"tensor {key!r} is in two shards of {directory}")
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from None
    return tensors


def packed_layers(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Layer name -> its packed tensors (``qweight`` ...), for every ``<layer>.qweight`` in ``tensors``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in PACKED_SUFFIXES:
            layers.setdefault(prefix, {})[suffix] = tensor
    return {name: parts for name, parts in layers.items() if "qweight" in parts}
