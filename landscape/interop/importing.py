"""One home for importing a quantized checkpoint against its base (see :mod:`landscape.interop`)."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from landscape.interop.gguf_file import FULL_PRECISION, full_precision_names, gguf_grid, load_gguf, read_gguf
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
from landscape.weights import Base, decoder_blocks, quantizable_layers, weight_matrix

MIN_COSINE = 0.5  # a quantized copy of w0 points its way (int2 RTN: about 0.9); another model's: about 0
IMPORTERS = ("gptq", "compressed-tensors")  # quantization_config.quant_method values read


def read_checkpoint_kind(checkpoint: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The checkpoint's kind (``gptq`` or ``gguf``) and what it says of its quantization, checked before any
    model is loaded."""
    path = Path(checkpoint)
    if path.is_file() and path.suffix.lower() == ".gguf":
        architecture, types = read_gguf(path)
        return "gguf", {"architecture": architecture, "tensor_types": dict(Counter(types.values()))}
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is neither a .gguf file nor a directory; "
                              f"give the folder a tool saved with save_pretrained (config.json with "
                              f"quantization_config, *.safetensors) or a GGUF file")
    config = read_config(path).get("quantization_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}/config.json has no quantization_config: not a quantized "
                              f"checkpoint (accepted quant_method: {IMPORTERS})")
    kind = config.get("quant_method")
    if kind not in IMPORTERS:
        raise CheckpointError(f"{path}: quant_method {kind!r} is not one this importer reads; accepted: "
                              f"{IMPORTERS}")
    if kind == "gptq":
        GPTQPackedConfig.from_config(config, str(path))  # its packing, bits and groups
    else:
        compressed_format(config, path)
    return kind, config


def import_checkpoint(base: Base, checkpoint: str | os.PathLike) -> QuantResult:
    """The quantized checkpoint at ``checkpoint`` (a GPTQ-packed folder or a GGUF file) as a result against
    ``base`` (its w0).

    Raises:
        CheckpointError: an unknown packing or config, tensors missing or misshapen, layers the base does not
            have, another architecture, or a checkpoint made from another base (named with both fingerprints).
    """
    started = time.perf_counter()
    path = Path(checkpoint)
    kind, config = read_checkpoint_kind(path)
    layers = quantizable_layers(base.model)
    if kind == "gguf":
        weights, full_precision, grid = _gguf_weights(base, path)
    elif kind == "compressed-tensors":
        weights, full_precision, grid = _compressed_weights(path, config)
    else:
        weights, full_precision, grid = _gptq_weights(base, path, config)
    check_same_base(base, full_precision, path)
    ordered = {}
    for name in (n for n in layers if n in weights):  # the base's forward order (its fingerprint's)
        w0 = weight_matrix(layers[name]).detach()
        w = weights[name]
        if tuple(w.shape) != tuple(w0.shape):
            raise CheckpointError(f"layer {name!r}: the checkpoint's weight is {tuple(w.shape)}, the base's "
                                  f"{tuple(w0.shape)}")
        cosine = float(torch.nn.functional.cosine_similarity(w.double().flatten(), w0.double().flatten(),
                                                             dim=0))
        if cosine < MIN_COSINE:
            raise CheckpointError(f"layer {name!r} of {path} is not a quantized copy of the base "
                                  f"{base.label!r}: cosine {cosine:.3f} with its w0 (a quantized copy has > "
                                  f"{MIN_COSINE}); import it against the model it was made from")
        ordered[name] = w.to(device=w0.device, dtype=w0.dtype)
    nearest = parse_format(grid["nearest_format"]) if grid["nearest_format"] else None
    on_grid = nearest is not None and on_our_grid(ordered, nearest, layers)
    grid = {**grid, "on_our_grid": on_grid}
    extra: dict[str, Any] = {"checkpoint_grid": grid}
    if not on_grid:
        stated = nearest.name if nearest else "/".join(grid.get("tensor_types", {})) or "int"
        extra["off_grid_label"] = f"{stated} (off our grid)"
    return QuantResult(ordered, nearest if on_grid else None, grid["kind"],
                       settings={"checkpoint": str(path.resolve()), "quantization_config": config,
                                 "checkpoint_sha256": files_sha256(path)},
                       base_model=base.label, base_fingerprint=base.fingerprint(list(ordered)),
                       seconds=time.perf_counter() - started, extra=extra)


def _gptq_weights(base: Base, directory: Path, config: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """A GPTQ-packed folder's dequantized layers, its full-precision tensors and its lattice."""
    cfg = GPTQPackedConfig.from_config(config, str(directory))
    tensors = read_tensors(directory)
    packed = packed_layers(tensors)
    if not packed:
        raise CheckpointError(f"{directory} holds no packed layers (no '<layer>.qweight' tensors)")
    layers = quantizable_layers(base.model)
    unknown = sorted(set(packed) - set(layers))
    if unknown:
        raise CheckpointError(f"{directory} quantizes layers the base {base.label!r} does not have: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (another architecture?)")
    weights, top_code_zeros = {}, 0
    for name, parts in packed.items():
        weights[name], info = dequantize(parts, cfg, weight_matrix(layers[name]).shape[1], name)
        top_code_zeros += info["v1_top_code_zeros"]
    packed_keys = {f"{n}.{suffix}" for n, parts in packed.items() for suffix in parts}
    nearest = nearest_format(cfg)
    grid = {**cfg.to_dict(), "kind": "gptq-packed", "nearest_format": nearest.name if nearest else None,
            "v1_top_code_zeros": top_code_zeros}
    return weights, {k: t for k, t in tensors.items() if k not in packed_keys}, grid


def compressed_format(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The weight arguments of a compressed-tensors checkpoint's one Linear group (integer weights only)."""
    groups = [g for g in (config.get("config_groups") or {}).values() if g.get("weights")]
    if len(groups) != 1:
        raise CheckpointError(f"{path}: {len(groups)} weight groups in config_groups; this importer reads "
                              f"checkpoints with one (every quantized linear in one integer format)")
    args = groups[0]["weights"]
    if args.get("type") != "int" or args.get("strategy") not in ("channel", "group", "tensor"):
        raise CheckpointError(f"{path}: weights of type {args.get('type')!r} and strategy "
                              f"{args.get('strategy')!r}; this importer reads type 'int' with strategy "
                              f"channel, group or tensor")
    return args


def _compressed_weights(directory: Path, config: dict[str, Any]
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """A compressed-tensors checkpoint's layers, dequantized by the compressed-tensors library as transformers
    loads it, its full-precision tensors and its lattice."""
    args = compressed_format(config, directory)
    raw = read_tensors(directory)
    quantized = sorted({k.removesuffix(".weight_scale") for k in raw if k.endswith(".weight_scale")})
    try:
        with warnings.catch_warnings():  # "the model has a quantization_config": ours only dequantizes
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_pretrained(
                str(directory), dtype=torch.float32, use_safetensors=True,  # never a pickle
                quantization_config=CompressedTensorsConfig(dequantize=True))
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"transformers (with compressed-tensors) cannot load {directory}: "
                              f"{err}") from None
    state = model.state_dict()
    weights = {n: state[f"{n}.weight"].detach() for n in quantized}
    full = {k: t for k, t in raw.items()
            if t.is_floating_point() and not any(k.startswith(n + ".") for n in quantized)}
    group = {"group": f"-g{args.get('group_size')}", "channel": "", "tensor": "-tensor"}[args["strategy"]]
    name = f"int{args['num_bits']}{group}" + ("-sym" if args.get("symmetric", True) else "")
    return weights, full, {"kind": "compressed-tensors", "weights": args,
                           "nearest_format": nearest_name(name)}


def nearest_name(name: str) -> str | None:
    """``name`` if it is one of our formats, else None."""
    try:
        return parse_format(name).name
    except FormatError:
        return None


def _gguf_weights(base: Base, path: Path
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """A GGUF's dequantized quantized layers, its unquantized tensors and what it says of its lattice."""
    model_type = getattr(base.model.config, "model_type", "")
    state = base.model.state_dict()
    n_blocks = len(decoder_blocks(base.model))
    loaded, types, _ = load_gguf(path, model_type, list(state), n_blocks)
    layers = quantizable_layers(base.model)
    quantized = [n for n in layers if types.get(f"{n}.weight", "F32") not in FULL_PRECISION]
    if not quantized:
        raise CheckpointError(f"{path} quantizes none of the base's linear layers (every one is stored in "
                              f"full precision)")
    weights = {n: loaded[f"{n}.weight"] for n in quantized}
    full = {k: loaded[k] for k in full_precision_names(types) if k in loaded}
    return weights, full, gguf_grid(types, quantized)


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


def files_sha256(path: Path) -> str:
    """sha256 (16 hex) of a GGUF file, or of a checkpoint folder's safetensors files (names and bytes, in name
    order)."""
    h = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
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
