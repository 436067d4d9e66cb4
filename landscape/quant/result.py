"""``QuantResult``: what every quantization method returns, saved as safetensors + JSON so it is never
recomputed.

A result holds the quantized ``(out, in)`` weight of each layer (dequantized values, on the format's
grid), and everything needed to trust and reuse it: the base model and a fingerprint of its w0, the
format, the method and its settings, the calibration data's provenance, the time taken and the
per-layer output MSE on the calibration inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from landscape.outputs import check_output_path
from landscape.quant.formats import QuantFormat, parse_format

RESULT_VERSION = 1


class ResultMismatchError(ValueError):
    """A saved quantized model does not belong to the base model it is applied to."""


class ResultFileError(ValueError):
    """A path that does not hold a readable saved result: truncated or corrupted files, or another format
    (a pickle or torch checkpoint is refused, never unpickled)."""


RESULT_EXTENSIONS = (".safetensors", ".json")
REQUIRED_METADATA = ("version", "format", "method", "settings", "base_model", "base_fingerprint",
                     "calibration", "seconds", "layer_mse", "extra", "layers")


@dataclass
class QuantResult:
    """A quantized model as a set of replacement weights for named layers.

    Attributes:
        weights: layer name -> quantized ``(out, in)`` weight (dequantized values on ``format``'s grid;
            for LoRC the low-rank correction is included, see ``extra``).
        format: the weight format (``None`` for full-precision controls such as fp-finetune).
        method: ``rtn``, ``gptq``, ``qaft``, ``gptq+lorc``, ``fp-finetune``, ``llm-qat``...
        settings: the method's settings (damping, block size, act-order, lr, steps, seed...).
        base_model: name of the model quantized; ``base_fingerprint``: hash of its w0 on these layers.
        calibration: provenance of the calibration data (:meth:`TokenSet.provenance`).
        seconds: wall time of the method.
        layer_mse: layer name -> output MSE on the calibration inputs (units: squared activations).
        extra: anything else (damping actually used per layer, LoRC extra parameters, training curve).
    """

    weights: dict[str, torch.Tensor]
    format: QuantFormat | None
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    base_fingerprint: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    layer_mse: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.format.name if self.format else 'fp32'}"

    @property
    def total_layer_mse(self) -> float:
        return float(sum(self.layer_mse.values()))

    def storage_bits(self, unquantized_bits: int = 32) -> int:
        """Bits to store the result's layers: codes, scales and zero points of ``format``, plus any extra
        tensors (LoRC's U and V); layers of a full-precision result count ``unquantized_bits`` per weight."""
        total = sum(self.format.storage_bits(tuple(w.shape)) if self.format else unquantized_bits * w.numel()
                    for w in self.weights.values())
        return total + int(self.extra.get("extra_storage_bits_total", 0))

    def metadata(self) -> dict[str, Any]:
        """The ``.json`` beside the weights: everything but the tensors, with the dtype and device they were
        computed in."""
        first = next(iter(self.weights.values()), None)
        return {
            "version": RESULT_VERSION,
            "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
            "device": str(first.device) if first is not None else None,
            "format": self.format.name if self.format else None,
            "method": self.method,
            "settings": self.settings,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            "calibration": self.calibration,
            "seconds": self.seconds,
            "layer_mse": self.layer_mse,
            "extra": self.extra,
            "layers": list(self.weights),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``.

        Both are written to temporary names first and renamed into place; the ``.json`` is the commit
        marker: an older one is removed before the new tensors move in and the new one comes last, so a
        run killed at any point leaves either a consistent pair or no ``.json`` (which :meth:`load`
        refuses), never new tensors under old metadata. Raises
        :class:`~landscape.outputs.OutputPathError` before writing anything if ``path`` is not writable.
        """
        path = result_stem(path)
        st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
        check_output_path(js)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: w.detach().contiguous().cpu() for name, w in self.weights.items()}
        st_tmp, js_tmp = st.with_name(st.name + ".tmp"), js.with_name(js.name + ".tmp")
        try:
            save_file(tensors, str(st_tmp), metadata={"landscape": json.dumps({"method": self.method})})
            js_tmp.write_text(json.dumps(self.metadata(), indent=1, default=_jsonable))
            js.unlink(missing_ok=True)
            os.replace(st_tmp, st)
            os.replace(js_tmp, js)
        except BaseException:
            st_tmp.unlink(missing_ok=True)
            js_tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, base_fingerprint: str | None = None) -> "QuantResult":
        """Load a saved result (no pickle: safetensors + JSON). With ``base_fingerprint``, refuse a
        result computed on a different base model."""
        given = Path(path)
        path = result_stem(path)
        st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
        if given.is_file() and given.suffix not in RESULT_EXTENSIONS:
            raise ResultFileError(f"{given} is not a saved QuantResult: results are read only from "
                                  f"STEM.safetensors + STEM.json (no pickle or torch checkpoint is ever "
                                  f"unpickled)")
        meta = read_result_metadata(path)
        try:
            weights = load_file(str(st))
        except SafetensorError as err:
            raise ResultFileError(f"{st} is not a readable safetensors file (truncated, corrupted, or "
                                  f"another format; pickles are never loaded): {err}") from None
        if sorted(weights) != sorted(meta["layers"]):
            raise ResultMismatchError(f"{path}: the tensors in {st.name} do not match the layers listed in "
                                      f"{js.name}")
        if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
            raise ResultMismatchError(
                f"{path} was computed on base {meta['base_model']!r} (fingerprint "
                f"{meta['base_fingerprint']}), not on this model (fingerprint {base_fingerprint})")
        return cls(
            weights={n: weights[n] for n in meta["layers"]},
            format=parse_format(meta["format"]) if meta["format"] else None,
            method=meta["method"],
            settings=meta["settings"],
            base_model=meta["base_model"],
            base_fingerprint=meta["base_fingerprint"],
            calibration=meta["calibration"],
            seconds=meta["seconds"],
            layer_mse=meta["layer_mse"],
            extra=meta["extra"],
        )


def read_result_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved result (format, method, settings, base fingerprint, layers...), without
    reading its weights: cheap checks of many saved results before any of them is loaded.

    Raises:
        FileNotFoundError: ``STEM.safetensors`` or ``STEM.json`` is missing; ResultFileError: the JSON is not
        a saved result's metadata; ResultMismatchError: written by another result version.
    """
    path = result_stem(path)
    st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
    if not st.exists() or not js.exists():
        raise FileNotFoundError(f"quantized model {path} needs both {st.name} and {js.name}")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultFileError(f"{js} is not valid JSON (truncated or corrupted?): {err}") from None
    missing = ([k for k in REQUIRED_METADATA if k not in meta] if isinstance(meta, dict)
               else list(REQUIRED_METADATA))
    if missing:
        raise ResultFileError(f"{js} is not the metadata of a saved QuantResult: it lacks {missing}")
    if meta["version"] != RESULT_VERSION:
        raise ResultMismatchError(f"{js}: result version {meta['version']!r}, this code reads "
                                  f"{RESULT_VERSION}")
    return meta


def result_stem(path: str | os.PathLike) -> Path:
    """``run/x.int4`` stays ``run/x.int4``; a given ``.safetensors`` or ``.json`` extension is dropped."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _with_ext(stem: Path, ext: str) -> Path:
    return stem.with_name(stem.name + ext)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, QuantFormat):
        return obj.name
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)
