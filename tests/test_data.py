"""Corpora, splits, segments and the calibration budget."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import landscape.models
from landscape import cli
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


# ------------------------------------------------------------------------------------- a user's text
def write_documents(path, docs, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_text_file_is_split_by_document_like_the_wiki_text(tokenizer, tmp_path, jsonl):
    docs = [" ".join(D.wiki_documents("train")[i].split()[:60]) for i in range(400)]
    path = write_documents(tmp_path / ("mine.jsonl" if jsonl else "mine.txt"), docs, jsonl)
    corpus = D.text_corpus(path)
    assert corpus == "text:" + str(path.resolve())
    held, train = D.documents(corpus, "heldout"), D.documents(corpus, "train")
    assert sorted(held + train) == sorted(docs) and not set(held) & set(train)
    # the same rule as the wiki split, applied to a document's text: an independent recount
    assert len(held) == sum(int(D.hashlib.sha256(d.encode()).hexdigest(), 16) % 20 == 0 for d in docs)
    assert 0 < len(held) < 0.15 * len(docs)
    calib = calibration_set(tokenizer, 32, 32, 0, corpus=corpus)
    evaluation = heldout_set(tokenizer, 32, corpus, max_segments=4)
    sha = D.file_sha256(path)[:16]
    for token_set in (calib, evaluation):
        assert token_set.provenance()["text_sha256"] == sha and token_set.corpus == corpus
    # the held-out windows are the held-out documents' tokens, joined by EOS
    expected = []
    for d in held:
        expected += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert evaluation.tokens.flatten().tolist() == expected[: 4 * 32]


def test_an_edited_text_file_is_tokenized_afresh(tokenizer, tmp_path):
    docs = [f"document {i} says {'many words ' * 30}" for i in range(60)]
    path = write_documents(tmp_path / "mine.txt", docs)
    before = heldout_set(tokenizer, 16, D.text_corpus(path))
    write_documents(path, [d.replace("words", "other words") for d in docs])
    after = heldout_set(tokenizer, 16, D.text_corpus(path))
    assert before.provenance()["text_sha256"] != after.provenance()["text_sha256"]
    assert before.content_hash != after.content_hash


def test_bad_text_files_are_refused_naming_the_file_and_what_is_accepted(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"'nowhere.txt' does not exist.*plain text.*JSON lines"):
        D.text_corpus("nowhere.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        D.text_corpus(tmp_path / "empty.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r'line 2 has no "text" string'):
        D.documents(D.text_corpus(bad), "train")
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        D.documents(D.text_corpus(bad), "train")
    few = write_documents(tmp_path / "few.txt", ["one document", "another document"])
    with pytest.raises(DataError, match=r"its 2 documents hold none for the 'heldout' split"):
        heldout_set(tokenizer, 16, D.text_corpus(few))
    small = write_documents(tmp_path / "small.txt", [f"short document number {i}" for i in range(40)])
    with pytest.raises(DataError, match=r"fewer than the 128 calibration sequences"):
        calibration_set(tokenizer, 128, 64, corpus=D.text_corpus(small))


def test_hub_corpora_fail_at_once_without_datasets_or_network(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"'c4' needs the `datasets` package.*--text FILE"):
        D.check_hub_corpus("c4")
    D.check_hub_corpus("wiki")  # built-in: nothing to check


@pytest.mark.parametrize("argv, message", [
    (["eval", "ref-tiny", "--text", "nowhere.txt"], "'nowhere.txt' does not exist"),
    (["scan", "ref-tiny", "--text", "nowhere.txt"], "'nowhere.txt' does not exist"),
    (["quantize", "ref-tiny", "--method", "rtn", "--format", "int4", "--out", "x", "--text", "nowhere.txt"],
     "'nowhere.txt' does not exist"),
    (["eval", "ref-tiny", "--corpus", "wikitext3"], "unknown corpus 'wikitext3'; accepted: wiki, sotu"),
])
def test_the_cli_refuses_bad_text_before_loading_a_model(monkeypatch, argv, message):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(landscape.models, "load_model", no_load)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in err.getvalue()
