"""One home for importing a quantized checkpoint against its base (see :mod:`landscape.interop`)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from landscape.interop.gptq_packed import (
    CheckpointError,
    GPTQPackedConfig,
    dequantize,
    packed_layers,
    read_config,
    read_tensors,
)
from landscape.quant.formats import FormatError, QuantFormat, make_grid, parse_format
from landscape.quant.result import QuantResult
from landscape.weights import Base, quantizable_layers, weight_matrix

MIN_COSINE = 0.5  # a quantized copy of w0 points its way (int2 RTN: about 0.9); another model's: about 0
IMPORTERS = ("gptq",)  # quantization_config.quant_method values read


def read_checkpoint_kind(checkpoint: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The checkpoint's ``quant_method`` and ``quantization_config``, checked before any model is loaded."""
    directory = Path(checkpoint)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is not a directory; give the folder a tool "
                              f"saved with save_pretrained (config.json with quantization_config, "
                              f"*.safetensors)")
    config = read_config(directory).get("quantization_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory}/config.json has no quantization_config: not a quantized "
                              f"checkpoint (accepted quant_method: {IMPORTERS})")
    kind = config.get("quant_method")
    if kind not in IMPORTERS:
        raise CheckpointError(f"{directory}: quant_method {kind!r} is not one this importer reads; accepted: "
                              f"{IMPORTERS}")
    GPTQPackedConfig.from_config(config, str(directory))  # its packing, bits and groups
    return kind, config


def import_checkpoint(base: Base, checkpoint: str | os.PathLike) -> QuantResult:
    """The quantized checkpoint at ``checkpoint`` as a result against ``base`` (its w0).

    Raises:
        CheckpointError: an unknown packing or config, tensors missing or misshapen, layers the base does not
            have, or a checkpoint made from another base (named with both fingerprints).
    """
    started = time.perf_counter()
    directory = Path(checkpoint)
    kind, config = read_checkpoint_kind(directory)
    cfg = GPTQPackedConfig.from_config(config, str(directory))
    tensors = read_tensors(directory)
    packed = packed_layers(tensors)
    layers = quantizable_layers(base.model)
    if not packed:
        raise CheckpointError(f"{directory} holds no packed layers (no '<layer>.qweight' tensors)")
    unknown = sorted(set(packed) - set(layers))
    if unknown:
        raise CheckpointError(f"{directory} quantizes layers the base {base.label!r} does not have: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (another architecture?)")
    packed_keys = {f"{n}.{suffix}" for n, parts in packed.items() for suffix in parts}
    check_same_base(base, {k: t for k, t in tensors.items() if k not in packed_keys}, directory)
    weights, top_code_zeros = {}, 0
    for name in (n for n in layers if n in packed):  # the base's forward order (its fingerprint's)
        w0 = weight_matrix(layers[name]).detach()
        w, info = dequantize(packed[name], cfg, w0.shape[1], name)
        if tuple(w.shape) != tuple(w0.shape):
            raise CheckpointError(f"layer {name!r}: the checkpoint's weight is {tuple(w.shape)}, the base's "
                                  f"{tuple(w0.shape)}")
        cosine = float(torch.nn.functional.cosine_similarity(w.double().flatten(), w0.double().flatten(),
                                                             dim=0))
        if cosine < MIN_COSINE:
            raise CheckpointError(f"layer {name!r} of {directory} is not a quantized copy of the base "
                                  f"{base.label!r}: cosine {cosine:.3f} with its w0 (a quantized copy has > "
                                  f"{MIN_COSINE}); import it against the model it was made from")
        weights[name] = w.to(device=w0.device, dtype=w0.dtype)
        top_code_zeros += info["v1_top_code_zeros"]
    nearest = nearest_format(cfg)
    on_grid = nearest is not None and on_our_grid(weights, nearest, layers)
    grid = {**cfg.to_dict(), "kind": f"{kind}-packed", "nearest_format": nearest.name if nearest else None,
            "on_our_grid": on_grid, "v1_top_code_zeros": top_code_zeros}
    extra: dict[str, Any] = {"checkpoint_grid": grid}
    if not on_grid:
        extra["off_grid_label"] = f"{nearest.name if nearest else f'int{cfg.bits}'} (off our grid)"
    return QuantResult(weights, nearest if on_grid else None, f"{kind}-packed",
                       settings={"checkpoint": str(directory.resolve()), "quantization_config": config,
                                 "checkpoint_sha256": files_sha256(directory)},
                       base_model=base.label, base_fingerprint=base.fingerprint(list(weights)),
                       seconds=time.perf_counter() - started, extra=extra)


def check_same_base(base: Base, full_precision: Mapping[str, torch.Tensor], directory: Path) -> None:
    """Refuse a checkpoint whose full-precision tensors differ from the base's same-named ones (compared in
    the checkpoint's dtype), naming both fingerprints."""
    state = base.model.state_dict()
    shared = sorted(k for k in full_precision if k in state and full_precision[k].is_floating_point())
    if not shared:
        return  # nothing to compare: the per-layer cosine check still applies
    ours = tensors_fingerprint({k: state[k].detach().to(full_precision[k].dtype) for k in shared})
    theirs = tensors_fingerprint({k: full_precision[k] for k in shared})
    if ours != theirs:
        differing = [k for k in shared if not torch.equal(state[k].detach().to(full_precision[k].dtype).cpu(),
                                                          full_precision[k])]
        raise CheckpointError(f"{directory} was made from another base than {base.label!r}: its "
                              f"full-precision tensors have fingerprint {theirs}, the base's {ours} "
                              f"({len(differing)} of {len(shared)} differ, e.g. {differing[:3]}); import it "
                              f"against its own base")


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (16 hex) of named tensors in sorted name order: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def files_sha256(directory: Path) -> str:
    """sha256 (16 hex) of the checkpoint's safetensors files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def nearest_format(cfg: GPTQPackedConfig) -> QuantFormat | None:
    """Our format with the checkpoint's bits, groups and symmetry (None where we have none, e.g. a group size
    our names do not take)."""
    group = f"-g{cfg.group_size}" if cfg.group_size != -1 else ""
    name = f"int{cfg.bits}{group}" + ("-sym" if cfg.sym else "")
    try:
        return parse_format(name)
    except FormatError:
        return None


def on_our_grid(weights: Mapping[str, torch.Tensor], fmt: QuantFormat, layers: Mapping[str, Any]) -> bool:
    """Whether every weight lies on ``fmt``'s grid of its layer's w0 (the grid every method of ours uses)."""
    for name, w in weights.items():
        w0 = weight_matrix(layers[name]).detach()
        try:
            grid = make_grid(w0.to(w.dtype), fmt, name)
        except FormatError:
            return False
        if not grid.contains(w):
            return False
    return True
