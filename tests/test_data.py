"""Corpora, splits, segments and the calibration budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from landscape import data as D
from landscape.data import DataError, calibration_set, heldout_set, token_stream


@pytest.fixture(scope="module")
def tokenizer():
    from landscape.refmodel import train_tokenizer

    return train_tokenizer(D.wiki_documents("train")[:300], vocab_size=512)


def test_wiki_split_is_disjoint_and_sized():
    all_docs = D._wiki_all()
    held = [t for t, _ in all_docs if D._is_heldout(t)]
    train = [t for t, _ in all_docs if not D._is_heldout(t)]
    assert not set(held) & set(train)
    assert len(held) + len(train) == len(all_docs)
    # about 1 in 20 documents is held out (measured: 499 of 10,033)
    assert 0.04 < len(held) / len(all_docs) < 0.06
    assert set(D.wiki_documents("heldout")).isdisjoint(D.wiki_documents("train"))


def test_calibration_and_heldout_never_overlap(tokenizer):
    calib = calibration_set(tokenizer, n_sequences=128, seq_len=64, seed=0)
    held = heldout_set(tokenizer, 64, max_segments=200)
    held_windows = {tuple(r.tolist()) for r in held.tokens}
    assert not any(tuple(r.tolist()) in held_windows for r in calib.tokens)
    # every calibration window is a window of the training stream
    train = token_stream(tokenizer, "wiki", "train")
    for row in calib.tokens[:5]:
        starts = np.flatnonzero(train == int(row[0]))
        assert any(np.array_equal(train[s : s + 64], row.numpy()) for s in starts)
    # calibration windows are disjoint among themselves (distinct chunks)
    assert len({tuple(r.tolist()) for r in calib.tokens}) == 128
    assert calib.n_scored_tokens == 128 * 63


def test_calibration_is_seeded(tokenizer):
    a = calibration_set(tokenizer, 128, 32, seed=1)
    b = calibration_set(tokenizer, 128, 32, seed=1)
    c = calibration_set(tokenizer, 128, 32, seed=2)
    assert torch.equal(a.tokens, b.tokens) and a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash


def test_heldout_segments_are_consecutive_windows(tokenizer):
    held = heldout_set(tokenizer, 32, max_segments=10)
    stream = token_stream(tokenizer, "wiki", "heldout")
    assert torch.equal(held.tokens.flatten(), torch.from_numpy(stream[: 320].astype(np.int64)))
    prov = held.provenance()
    assert prov["seq_len"] == 32 and prov["stride"] == 32 and prov["n_scored_tokens"] == 10 * 31


@pytest.mark.parametrize("seq_len", [0, 1, -5, 2.5])
def test_invalid_sequence_length_is_refused(tokenizer, seq_len):
    with pytest.raises(DataError, match="seq_len"):
        calibration_set(tokenizer, 128, seq_len)


def test_too_small_corpus_for_128_sequences(tokenizer, monkeypatch):
    monkeypatch.setattr(D, "token_stream", lambda tok, corpus, split: np.arange(1000, dtype=np.int32))
    with pytest.raises(DataError, match=r"fewer than the 128 calibration sequences"):
        calibration_set(tokenizer, 128, 64)


def test_seq_len_longer_than_context_is_refused(tokenizer):
    with pytest.raises(DataError, match="context length"):
        heldout_set(tokenizer, 1024, context_length=256)


def test_unknown_corpus_lists_valid(tokenizer):
    with pytest.raises(DataError, match="valid"):
        heldout_set(tokenizer, 32, corpus="nope")


def test_sotu_reader(tmp_path, monkeypatch):
    for year, text in [(2002, "Second."), (2001, "First.")]:
        (tmp_path / f"{year}_x_y.json").write_text(json.dumps({"year": str(year), "text": f" {text} "}))
    monkeypatch.setattr(D, "_sotu_dir", lambda: tmp_path)
    assert D.sotu_documents() == ["First.", "Second."]
    with pytest.raises(DataError, match="heldout"):
        D.documents("sotu", "train")


def test_token_set_subset_keeps_provenance(tokenizer):
    held = heldout_set(tokenizer, 16, max_segments=6)
    sub = held.subset([0, 2])
    assert torch.equal(sub.tokens, held.tokens[[0, 2]])
    assert sub.meta["subset_of"] == held.content_hash


def test_asking_for_more_windows_than_the_text_holds_is_an_error_not_fewer_windows():
    stream = np.arange(100)
    tokens, _ = D.segments_from_stream(stream, 10, max_segments=10)
    assert tokens.shape == (10, 10)
    with pytest.raises(DataError,
                       match=r"max_segments=11 asked for, but the text \(100 tokens\) holds only 10 windows"):
        D.segments_from_stream(stream, 10, max_segments=11)
    with pytest.raises(DataError, match="holds only 19 windows of seq_len=10 at stride 5"):
        D.segments_from_stream(stream, 10, stride=5, max_segments=20)
