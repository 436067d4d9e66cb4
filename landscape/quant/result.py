"""``QuantResult``: what every quantization method returns, saved as safetensors + JSON so it is never recomputed.

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

from .formats import QuantFormat, parse_format

RESULT_VERSION = 1


class ResultMismatchError(ValueError):
    """A saved quantized model does not belong to the base model it is applied to."""


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

    def metadata(self) -> dict[str, Any]:
        return {
            "version": RESULT_VERSION,
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
        """Write ``<path>.safetensors`` and ``<path>.json`` (atomically: temporary names, then rename)."""
        from safetensors.torch import save_file

        path = result_stem(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: w.detach().contiguous().cpu() for name, w in self.weights.items()}
        meta = self.metadata()
        st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
        st_tmp, js_tmp = st.with_name(st.name + ".tmp"), js.with_name(js.name + ".tmp")
        save_file(tensors, str(st_tmp), metadata={"landscape": json.dumps({"method": self.method})})
        js_tmp.write_text(json.dumps(meta, indent=1, default=_jsonable))
        os.replace(st_tmp, st)
        os.replace(js_tmp, js)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, base_fingerprint: str | None = None) -> "QuantResult":
        """Load a saved result (no pickle: safetensors + JSON). With ``base_fingerprint``, refuse a
        result computed on a different base model."""
        from safetensors.torch import load_file

        path = result_stem(path)
        st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
        if not st.exists() or not js.exists():
            raise FileNotFoundError(f"quantized model {path} needs both {st.name} and {js.name}")
        meta = json.loads(js.read_text())
        if meta.get("version") != RESULT_VERSION:
            raise ResultMismatchError(f"{js}: result version {meta.get('version')!r}, this code reads {RESULT_VERSION}")
        weights = load_file(str(st))
        if sorted(weights) != sorted(meta["layers"]):
            raise ResultMismatchError(f"{path}: the tensors in {st.name} do not match the layers listed in {js.name}")
        if base_fingerprint is not None and meta["base_fingerprint"] != base_fingerprint:
            raise ResultMismatchError(
                f"{path} was computed on base {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}), "
                f"not on this model (fingerprint {base_fingerprint})")
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
