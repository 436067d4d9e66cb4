"""GGUF files (llama.cpp's format), dequantized through transformers' ``gguf_file`` loader (which uses the
``gguf`` package), with the tensor types read from the file itself.

What a GGUF records of its lattice is each tensor's type: ``Q4_1`` blocks of 32 weights ``d * q + m`` (our
``int4-g32-fz``: a real-valued zero point spanning each block's [min, max]), ``Q5_1`` likewise at 5 bits,
``Q8_0`` and ``Q4_0``/``Q5_0`` symmetric blocks of 32 (``d * q``, codes -128..127, -8..7 and -16..15: no grid
of ours has their asymmetric code ranges, so ``int<b>-g32-sym`` is only their nearest name), and K-quants
(super-blocks with quantized scales), which have no counterpart here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import torch
from transformers import AutoModelForCausalLM

from landscape.interop.gptq_packed import CheckpointError

GGUF_NEAREST = {"Q4_1": "int4-g32-fz", "Q5_1": "int5-g32-fz", "Q8_0": "int8-g32-sym", "Q4_0": "int4-g32-sym",
                "Q5_0": "int5-g32-sym"}
FULL_PRECISION = ("F32", "F16", "BF16", "F64")


def read_gguf(path: Path) -> tuple[str, dict[str, str]]:
    """The file's ``general.architecture`` and each tensor's type name (``Q4_1``, ``F32``...)."""
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file: {err}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointError(f"{path} has no general.architecture: not a model GGUF")
    architecture = bytes(field.parts[-1]).decode()
    return architecture, {t.name: t.tensor_type.name for t in reader.tensors}


def check_architecture(architecture: str, model_type: str, path: Path) -> None:
    """Refuse a GGUF of another architecture than the base's (named both ways)."""
    if architecture != model_type:  # llama.cpp names architectures as transformers' model types do
        raise CheckpointError(f"{path} is a GGUF of architecture {architecture!r}; the base is a "
                              f"{model_type!r} model: import it against a base of its own architecture")


def gguf_names(model_type: str, state_names: list[str], n_blocks: int) -> dict[str, str]:
    """Each of the base's state-dict names -> the GGUF tensor name llama.cpp gives it (where one exists)."""
    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(model_type)
    if arch is None:
        return {}
    table = gguf.get_tensor_name_map(arch, n_blocks)
    names = {}
    for name in state_names:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            names[name] = mapped
    return names


def load_gguf(path: Path, model_type: str, state_names: list[str], n_blocks: int
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """The dequantized state dict of the GGUF at ``path`` (float32, through transformers), the GGUF type of
    each state-dict name that has one, and the file's architecture."""
    architecture, types = read_gguf(path)
    check_architecture(architecture, model_type, path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"transformers cannot load {path}: {err}") from None
    mapping = gguf_names(model_type, state_names, n_blocks)
    return ({k: v.detach() for k, v in model.state_dict().items()},
            {name: types[g] for name, g in mapping.items() if g in types}, architecture)


def gguf_grid(types: dict[str, str], layers: list[str]) -> dict[str, Any]:
    """What the file says of the quantized layers' lattice: their tensor types, and our nearest format when
    they share one type that has one."""
    used = Counter(types.get(f"{n}.weight", "?") for n in layers)
    nearest = GGUF_NEAREST.get(next(iter(used))) if len(used) == 1 else None
    return {"kind": "gguf", "tensor_types": dict(used), "nearest_format": nearest}


def full_precision_names(types: dict[str, str]) -> list[str]:
    """State-dict names stored unquantized in the GGUF (compared with the base's exactly)."""
    return sorted(name for name, kind in types.items() if kind in FULL_PRECISION)
