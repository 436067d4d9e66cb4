"""``QuantResult``: what every quantization method returns, saved as safetensors + JSON so it is never
recomputed.

A result holds the quantized ``(out, in)`` weight of each layer (dequantized values, on the format's
grid), and everything needed to trust and reuse it: the base model and a fingerprint of its w0, the
format, the method and its settings, the calibration data's provenance, the time taken and the
per-layer output MSE on the calibration inputs.

**Identity by content.** A saved result's JSON records ``"sha256": {"tensors": T, "metadata": M}``:
``T`` is :func:`tensors_sha256` of its weights (layer by layer in sorted name order: name, dtype, shape,
raw bytes; independent of how the safetensors file lays them out) and ``M`` is :func:`metadata_sha256` of
every other key of the JSON (canonical JSON: sorted keys, no whitespace). :func:`read_result_metadata`
verifies ``M`` and :meth:`QuantResult.load` also ``T``: a result changed after it was saved is refused
(:class:`ResultIntegrityError`). ``T`` is the result's identity: a displacement direction records it
(:class:`landscape.engine.directions.DirectionSpec`), so a resumed scan whose result was replaced is refused.
Results saved before hashes existed (``version`` 1) still load, unverified: nothing recorded can be
compared, and their identity is the hash of the tensors as they are read. (The hashes catch accidents and
partial edits, not a forger: a pair rewritten with both hashes recomputed, or turned into version 1, passes
them; the grid check below is what catches changed weights then.)

**Checked against its own grid.** A result that states a format lies on the lattice of that format on its
base's w0 (:meth:`QuantResult.grid_for`): loading it with its ``base``, comparing it, or building a
displacement from it (also the quantization table and the misalignment candidates: wherever the base is
known) refuses weights off that lattice (:class:`ResultOffGridError`), so a result whose
weights were changed and re-hashed is never reported as, say, ``rtn int4``. Exempt by design: results
without a format (``fp-finetune`` and other full-precision controls) and LoRC corrections
(``<method>+lorc``, ``Q(W) + U V``); learned scales (``extra["learned_scales"]``) are checked on their
learned lattice.

**Never overwritten silently.** :meth:`QuantResult.save` refuses a path where either file of the pair
exists unless ``overwrite=True`` (:func:`check_result_path`, for commands to call before any work).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from landscape.outputs import OutputPathError, check_output_path
from landscape.quant.formats import Grid, QuantFormat, make_grid, parse_format
from landscape.weights import Base, LayerSelectionError, as_base, get_layer, quantizable_layers, weight_matrix

RESULT_VERSION = 2  # 2: the JSON records the sha256 of the tensors and of the metadata
READABLE_VERSIONS = (1, 2)  # 1: saved before content hashes, loaded unverified
HASH_KEY = "sha256"
OFF_GRID_METHOD_SUFFIX = "+lorc"  # LoRC: Q(W) + U V, off the grid by design


class ResultMismatchError(ValueError):
    """A saved quantized model does not belong to the base model it is applied to."""


class ResultFileError(ValueError):
    """A path that does not hold a readable saved result: truncated or corrupted files, or another format
    (a pickle or torch checkpoint is refused, never unpickled)."""


class ResultIntegrityError(ResultFileError):
    """A saved result whose tensors or metadata no longer match the sha256 recorded when it was saved."""


class ResultOffGridError(ResultMismatchError):
    """A result whose weights are not on the grid its format states, on its base's w0."""


class ResultExistsError(OutputPathError):
    """A saved result already at an output path that was not to be overwritten."""


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
        """``<method> <format>``; a result without a format: ``fp32``, or what ``extra["off_grid_label"]``
        says (an imported checkpoint whose lattice is none of ours: ``int4-g128 (off our grid)``)."""
        stated = self.format.name if self.format else self.extra.get("off_grid_label", "fp32")
        return f"{self.method} {stated}"

    @property
    def total_layer_mse(self) -> float:
        return float(sum(self.layer_mse.values()))

    def storage_bits(self, unquantized_bits: int = 32) -> int:
        """Bits to store the result's layers: codes, scales and zero points of ``format``, plus any extra
        tensors (LoRC's U and V); layers of a full-precision result count ``unquantized_bits`` per weight."""
        stored = self.format or _checkpoint_format(self.extra)
        total = sum(stored.storage_bits(tuple(w.shape)) if stored else unquantized_bits * w.numel()
                    for w in self.weights.values())
        return total + int(self.extra.get("extra_storage_bits_total", 0))

    def tensors_sha256(self) -> str:
        """The identity of the weights (:func:`tensors_sha256`): what a saved result records and a
        displacement direction built from it records."""
        return tensors_sha256(self.weights)

    def grid_for(self, name: str, w0: torch.Tensor) -> Grid | None:
        """The lattice the weight of layer ``name`` lies on, given that layer's ``(out, in)`` w0.

        Returns :func:`make_grid` of ``format`` on ``w0`` (the one grid of every method), with the learned
        per-group scales of ``extra["learned_scales"]`` where the run learned them (LSQ: same zero points,
        learned scales); None where the result is on no grid of its format: no format (full-precision
        controls such as ``fp-finetune``) or a LoRC correction (method ``<base>+lorc``).
        """
        return grid_for(self.format, self.method, self.extra, name, w0)

    def check_grid(self, model: nn.Module | Base, what: str | None = None) -> None:
        """Raise :class:`ResultOffGridError` unless every layer's weight lies on :meth:`grid_for` of that
        layer of ``model`` (its base, at w0); ``what`` names the result in the message (default: its
        label). One layer at a time, on w0's device."""
        check_on_grid(self.weights, self.format, self.method, self.extra, model, what or repr(self.label))

    def metadata(self) -> dict[str, Any]:
        """The ``.json`` beside the weights: everything but the tensors, with the dtype and device they were
        computed in (:meth:`save` adds the ``sha256`` of the tensors and of this metadata)."""
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

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (with the sha256 of both, see the module
        docstring); returns the stem.

        Both are written to temporary names first and renamed into place; the ``.json`` is the commit
        marker: an older one is removed before the new tensors move in and the new one comes last, so a
        run killed at any point leaves either a consistent pair or no ``.json`` (which :meth:`load`
        refuses), never new tensors under old metadata. Before writing anything raises
        :class:`~landscape.outputs.OutputPathError` if ``path`` is not writable and
        :class:`ResultExistsError` if either file exists, unless ``overwrite`` (which replaces them).
        """
        path = check_result_path(path, overwrite)
        st, js = _with_ext(path, ".safetensors"), _with_ext(path, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: w.detach().contiguous().cpu() for name, w in self.weights.items()}
        meta = json.loads(json.dumps(self.metadata(), default=_jsonable))  # as it reads back
        meta[HASH_KEY] = {"tensors": tensors_sha256(tensors), "metadata": metadata_sha256(meta)}
        st_tmp, js_tmp = st.with_name(st.name + ".tmp"), js.with_name(js.name + ".tmp")
        try:
            save_file(tensors, str(st_tmp), metadata={"landscape": json.dumps({"method": self.method})})
            js_tmp.write_text(json.dumps(meta, indent=1))
            # verified before it moves in: what a full disk or a failing device wrote is never committed
            if tensors_sha256(load_file(str(st_tmp))) != meta[HASH_KEY]["tensors"] or \
                    json.loads(js_tmp.read_text()) != meta:
                raise ResultFileError(f"the result written to {st_tmp} and {js_tmp} did not read back as "
                                      f"written; nothing was replaced: check the disk and save again")
            js.unlink(missing_ok=True)
            os.replace(st_tmp, st)
            os.replace(js_tmp, js)
        except BaseException as err:
            st_tmp.unlink(missing_ok=True)
            js_tmp.unlink(missing_ok=True)
            if isinstance(err, (OSError, SafetensorError)):  # a full disk, a file-size limit: one message
                reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
                raise ResultFileError(f"could not write the result {path} ({reason}): nothing "
                                      f"was replaced; make room (or raise the file-size limit) and run "
                                      f"again") from None
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, base_fingerprint: str | None = None, *,
             base: nn.Module | Base | None = None) -> QuantResult:
        """Load a saved result (no pickle: safetensors + JSON), verified against the sha256 its JSON records.

        Args:
            path: ``STEM``, ``STEM.json`` or ``STEM.safetensors``.
            base_fingerprint: refuse a result computed on a base with another fingerprint.
            base: the base model (or :class:`~landscape.weights.Base`) it must belong to: its fingerprint on
                the result's layers is checked, and every weight must lie on the grid the result states
                (:meth:`check_grid`).

        Raises:
            ResultFileError: missing, unreadable or not a result; ResultIntegrityError: tensors or metadata
            changed after the result was saved; ResultMismatchError: another base, layers that do not match
            the metadata, or (ResultOffGridError) weights off the grid. A result saved before content hashes
            (version 1) is loaded without the integrity check (module docstring).
        """
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
        recorded = recorded_tensors_sha256(meta)
        if recorded is not None and (actual := tensors_sha256(weights)) != recorded:
            raise ResultIntegrityError(_changed_tensors(st, js, recorded, actual))
        if sorted(weights) != sorted(meta["layers"]):
            raise ResultMismatchError(f"{path}: the tensors in {st.name} do not match the layers listed in "
                                      f"{js.name}")
        expected = [] if base_fingerprint is None else [base_fingerprint]
        if base is not None:
            base = as_base(base)
            _check_layers(base, path, meta["layers"])
            expected.append(base.fingerprint(meta["layers"]))
        for fingerprint in expected:
            if meta["base_fingerprint"] != fingerprint:
                raise ResultMismatchError(
                    f"{path} was computed on base {meta['base_model']!r} (fingerprint "
                    f"{meta['base_fingerprint']}), not on this model (fingerprint {fingerprint})")
        result = cls(
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
        if base is not None:
            result.check_grid(base, str(path))
        return result


# ------------------------------------------------------------------------------------ content hashes
def _checkpoint_format(extra: Mapping[str, Any]) -> QuantFormat | None:
    """The format whose storage an imported checkpoint off our grid has (its bits, groups and scales)."""
    nearest = (extra.get("checkpoint_grid") or {}).get("nearest_format")
    return parse_format(nearest) if nearest else None


def tensors_sha256(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 (64 hex) of a result's weights: for each layer in sorted name order, its name, dtype and
    shape (as JSON) then its raw little-endian bytes. Independent of the file's layout and of the order of
    ``weights``; a :class:`~landscape.engine.directions.LayerwiseTensors` map is read one layer at a time."""
    h = hashlib.sha256()
    for name in sorted(weights):
        _hash_tensor(h, name, weights[name])
    return h.hexdigest()


def _hash_tensor(h: Any, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)


def metadata_sha256(meta: Mapping[str, Any]) -> str:
    """sha256 (64 hex) of a result's JSON metadata without its ``sha256`` entry, as canonical JSON (sorted
    keys, no whitespace, ASCII): the same for the dict written and the dict read back."""
    body = {k: v for k, v in meta.items() if k != HASH_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=True).encode()).hexdigest()


def recorded_tensors_sha256(meta: Mapping[str, Any]) -> str | None:
    """The tensors' sha256 recorded in a result's metadata (None for a result saved before hashes)."""
    recorded = meta.get(HASH_KEY)
    return recorded["tensors"] if isinstance(recorded, Mapping) else None


def saved_tensors_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a saved result's tensors (:func:`tensors_sha256`), read one tensor at a time, checked
    against the one its JSON records (a result saved before hashes: computed, unchecked).

    Raises:
        ResultIntegrityError: the tensors do not match the recorded sha256; ResultFileError, FileNotFoundError
        as :func:`read_result_metadata` and for an unreadable safetensors file.
    """
    stem = result_stem(path)
    meta = read_result_metadata(stem)
    st, js = _with_ext(stem, ".safetensors"), _with_ext(stem, ".json")
    h = hashlib.sha256()
    try:
        with safe_open(str(st), framework="pt") as f:
            for name in sorted(f.keys()):
                _hash_tensor(h, name, f.get_tensor(name))
    except SafetensorError as err:
        raise ResultFileError(f"{st} is not a readable safetensors file (truncated, corrupted, or "
                              f"another format; pickles are never loaded): {err}") from None
    actual, recorded = h.hexdigest(), recorded_tensors_sha256(meta)
    if recorded is not None and actual != recorded:
        raise ResultIntegrityError(_changed_tensors(st, js, recorded, actual))
    return actual


def _changed_tensors(st: Path, js: Path, recorded: str, actual: str) -> str:
    return (f"the tensors of {st} do not match the sha256 recorded in {js.name} (recorded {recorded[:16]}, "
            f"the file holds {actual[:16]}): the file was changed after it was saved; re-run the command "
            f"that made it")


# --------------------------------------------------------------------------------------- the grid
def on_a_grid(fmt: QuantFormat | None, method: str) -> bool:
    """Whether a result of ``method`` in ``fmt`` lies on a grid of its format: every result with a format but
    LoRC's (``<method>+lorc``: ``Q(W) + U V``, off the grid by design); no result without one."""
    return fmt is not None and not method.endswith(OFF_GRID_METHOD_SUFFIX)


def grid_for(fmt: QuantFormat | None, method: str, extra: Mapping[str, Any], name: str,
             w0: torch.Tensor) -> Grid | None:
    """:meth:`QuantResult.grid_for` from a result's format, method and ``extra`` (also from its metadata
    alone)."""
    if not on_a_grid(fmt, method):
        return None
    grid = make_grid(w0, fmt, name)
    learned = extra.get("learned_scales") if isinstance(extra, Mapping) else None
    if learned is None:
        return grid
    if name not in learned:
        raise ResultMismatchError(f"the result records learned scales, but none for layer {name!r}")
    scale = torch.tensor(learned[name], dtype=grid.scale.dtype, device=grid.scale.device)
    if tuple(scale.shape) != tuple(grid.scale.shape):
        raise ResultMismatchError(f"the learned scales of layer {name!r} have shape {tuple(scale.shape)}, "
                                  f"its {fmt.name} grid has {tuple(grid.scale.shape)} groups")
    return Grid(grid.fmt, scale, grid.zero, grid.group_size)


def check_on_grid(weights: Mapping[str, torch.Tensor], fmt: QuantFormat | None, method: str,
                  extra: Mapping[str, Any], model: nn.Module | Base, what: str) -> None:
    """Raise :class:`ResultOffGridError` unless every weight lies on :func:`grid_for` of its layer of
    ``model`` at w0 (nothing to check without a grid). ``weights`` may be read one layer at a time.

    The lattice is built in the result's dtype (a bfloat16 result on the bfloat16 values of w0); a weight is
    on it within :meth:`Grid.contains`'s tolerance.
    """
    if not on_a_grid(fmt, method):
        return
    model = as_base(model).model
    for name in weights:
        try:
            w0 = weight_matrix(get_layer(model, name)).detach()
        except LayerSelectionError as err:
            raise ResultMismatchError(f"{what}: {err}") from None
        w = weights[name].to(w0.device)
        if tuple(w.shape) != tuple(w0.shape):
            raise ResultMismatchError(f"{what}: weight of {name!r} has shape {tuple(w.shape)}, the layer's "
                                      f"(out, in) weight is {tuple(w0.shape)}")
        grid = grid_for(fmt, method, extra, name, w0.to(w.dtype))
        if not grid.contains(w):
            steps = (w - grid.round(w)).abs() / grid.per_column(grid.scale).to(w)
            off = int((steps > 1e-3).sum())
            raise ResultOffGridError(
                f"{what} ({method} {fmt.name}): {off} of {w.numel()} weights of layer {name!r} are off the "
                f"{fmt.name} grid of its base's w0 (up to {float(steps.max()):.3g} grid steps from the "
                f"nearest lattice point), where a {method} result lies on it: its weights were changed after "
                f"quantization; re-run the command that made it")


# ------------------------------------------------------------------------------------------ files
def read_result_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved result (format, method, settings, base fingerprint, layers...), without
    reading its weights: cheap checks of many saved results before any of them is loaded. The metadata's
    sha256 is verified (version 2); a version-1 result, saved before hashes, is returned unverified.

    Raises:
        FileNotFoundError: ``STEM.safetensors`` or ``STEM.json`` is missing; ResultFileError: the JSON is not
        a saved result's metadata; ResultIntegrityError: the JSON was edited after it was saved;
        ResultMismatchError: written by another result version.
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
    if meta["version"] not in READABLE_VERSIONS:
        raise ResultMismatchError(f"{js}: result version {meta['version']!r}, this code reads "
                                  f"{READABLE_VERSIONS}")
    if meta["version"] >= 2:
        recorded = meta.get(HASH_KEY)
        if not (isinstance(recorded, Mapping) and all(isinstance(recorded.get(k), str)
                                                      for k in ("tensors", "metadata"))):
            raise ResultIntegrityError(f"{js} (result version {meta['version']}) lacks the sha256 of its "
                                       f"tensors and metadata ({HASH_KEY!r}: {{'tensors': ..., 'metadata': "
                                       f"...}}): it was edited after it was saved; re-run the command that "
                                       f"made it")
        if (actual := metadata_sha256(meta)) != recorded["metadata"]:
            raise ResultIntegrityError(
                f"{js} does not match the sha256 of its metadata recorded in it (recorded "
                f"{recorded['metadata'][:16]}, the file holds {actual[:16]}): it was edited after it was "
                f"saved; re-run the command that made it")
    return meta


def check_result_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The stem of a result to be saved at ``path``, after checking before any work that both files can be
    written: raises :class:`~landscape.outputs.OutputPathError` for an unwritable location and
    :class:`ResultExistsError` if ``STEM.safetensors`` or ``STEM.json`` exists, unless ``overwrite``."""
    stem = result_stem(path)
    for file in (_with_ext(stem, ".json"), _with_ext(stem, ".safetensors")):
        check_output_path(file)
        if not overwrite and (file.exists() or file.is_symlink()):
            raise ResultExistsError(f"{file} already exists (a saved result at {stem}): choose another "
                                    f"output path, or pass --overwrite (overwrite=True) to replace it")
    return stem


def result_stem(path: str | os.PathLike) -> Path:
    """``run/x.int4`` stays ``run/x.int4``; a given ``.safetensors`` or ``.json`` extension is dropped."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def distinct_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A name for each saved result that no other of ``paths`` has: the shortest trailing part of its path
    (stem) that differs from every other's, e.g. ``runs/a/g4``, ``runs/b/g4``, ``q/x`` -> ``a/g4``, ``b/g4``,
    ``x``. Paths are compared absolute; the same result given twice is refused (ValueError)."""
    stems = [result_stem(p) for p in paths]
    parts = [Path(os.path.abspath(s)).parts for s in stems]
    seen: dict[tuple[str, ...], Path] = {}
    for stem, key in zip(stems, parts):
        if key in seen:
            raise ValueError(f"the saved result {stem} is given twice (also as {seen[key]})")
        seen[key] = stem
    names = []
    for i, mine in enumerate(parts):
        k = 1
        while any(other[-k:] == mine[-k:] for j, other in enumerate(parts) if j != i):
            k += 1
        names.append(Path(*mine[-k:]).as_posix())
    return names


def _check_layers(base: Base, path: Path, layers: Sequence[str]) -> None:
    available = quantizable_layers(base.model)
    unknown = [n for n in layers if n not in available]
    if unknown:
        raise ResultMismatchError(f"{path} has layers this model does not have, e.g. {unknown[:3]}; its "
                                  f"quantizable layers are e.g. {list(available)[:3]}")


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
