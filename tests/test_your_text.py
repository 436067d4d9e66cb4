"""Your text end to end: ``run_all --text FILE`` (``make figures TEXT=...``) calibrates on the file's training
documents and measures on its held-out ones, in every store and on every page, instead of the bundled wiki
text; text too short for the calibration budget fails before any store is written.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import offline_pipeline, tiny_model

import landscape.data
from analyses import run_all
from analyses.session import eval_set, parse_args, session_from_args
from landscape import data as D
from landscape.objectives import nll
from landscape.refmodel import train_tokenizer
from landscape.store import read_store

pytestmark = pytest.mark.filterwarnings("ignore::landscape.curvature.ConvergenceWarning")
WORDS = ("river stone market harbour lantern orchard winter copper meadow signal bridge ledger forest "
         "engine quiet bright distant narrow heavy early carries builds follows opens gathers under "
         "beside toward through after").split()


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of random sentences over a small vocabulary (not wiki text)."""
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choice(WORDS) for _ in range(9)).capitalize() + "." for _ in range(6))
            for _ in range(n)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny GPT-2-architecture model directory, a JSON-lines text of 400 documents, and the figure folder of
    ``run_all --tiny --model DIR --text FILE``."""
    root = tmp_path_factory.mktemp("your-text")
    text = root / "my corpus.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(400)))
    with offline_pipeline(root):
        tokenizer = train_tokenizer(D.wiki_documents("train")[:300] + synthetic_documents(50, seed=1),
                                    vocab_size=512)
        model_dir = root / "my-gpt2"
        tiny_model("gpt2", vocab=len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        argv = ["--tiny", "--model", str(model_dir), "--text", str(text), "--out", str(root / "figures"),
                "--no-png", "--no-progress"]
        assert run_all.main(argv) == 0
        yield root, argv, text


def quant_stores(figures: Path) -> list[Path]:
    stores = sorted((figures / "data").rglob("quant_table.h5"))
    assert stores, f"no quantization tables under {figures / 'data'}"
    return stores


def test_every_table_calibrates_and_evaluates_on_the_text(pipeline):
    root, _, text = pipeline
    corpus = D.TEXT_PREFIX + str(text.resolve())
    digest = hashlib.sha256(text.read_bytes()).hexdigest()[:16]
    for path in quant_stores(root / "figures"):
        prov = read_store(path).provenance
        assert prov["protocol"]["calib_corpus"] == corpus
        assert prov["protocol"]["eval_corpora"] == [corpus, "sotu"]
        assert prov["calibration"]["corpus"] == corpus and prov["calibration"]["text_sha256"] == digest
        assert prov["evaluation"][corpus]["split"] == "heldout"


def test_the_in_domain_nll_is_the_texts_held_out_nll(pipeline):
    """The stored w0 NLL equals a direct evaluation on the file's held-out documents (not wiki's)."""
    root, argv, text = pipeline
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDSCAPE_CACHE", str(root / "cache"))
        mp.setattr(landscape.data, "_sotu_dir", lambda: root / "sotu")
        session = session_from_args(parse_args("", argv))
        lm = session.model(session.profile.model)
        held = D.heldout_set(lm.tokenizer, session.profile.eval_seq_len, D.text_corpus(text),
                             session.profile.eval_segments)
        wiki = D.heldout_set(lm.tokenizer, session.profile.eval_seq_len, "wiki",
                             session.profile.eval_segments)
        assert torch.equal(eval_set(session, session.profile.model).tokens, held.tokens)
        direct, on_wiki = nll(lm.model, held).value, nll(lm.model, wiki).value
    data = read_store(quant_stores(root / "figures")[0])
    w0 = list(data.arrays["variants/label"]).index("fp32")
    stored = float(data.arrays["nll/text:my corpus.jsonl"][w0])
    assert stored == pytest.approx(direct, abs=1e-6)
    assert abs(stored - on_wiki) > 1e-3  # the text, not the bundled wiki, was measured


def test_pages_name_the_text_not_wiki(pipeline):
    root, _, _ = pipeline
    pages = sorted((root / "figures").glob("fig*.html"))
    assert len(pages) == 7
    for page in pages:
        assert "wiki" not in page.read_text(encoding="utf-8").replace("plotly", ""), page.name
    assert "in-domain: my corpus.jsonl held-out" in (root / "figures" / "fig1_nll_vs_bits.html").read_text()
    assert "text:my corpus.jsonl" in (root / "figures" / "index.html").read_text()


def test_an_edited_text_gets_new_stores(pipeline, tmp_path):
    root, argv, text = pipeline
    before = session_from_args(parse_args("", argv)).store_path("m", "facts", {})
    edited = tmp_path / text.name
    edited.write_text(text.read_text() + json.dumps({"text": "One more document."}) + "\n")
    after = session_from_args(parse_args("", [*argv, "--text", str(edited)])).store_path("m", "facts", {})
    assert before != after


def test_text_too_short_for_the_calibration_fails_before_any_store(pipeline, tmp_path):
    root, argv, _ = pipeline
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(synthetic_documents(3, seed=2)))
    out = tmp_path / "figures"
    argv = [a for a in argv]
    argv[argv.index("--text") + 1], argv[argv.index("--out") + 1] = str(small), str(out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDSCAPE_CACHE", str(root / "cache"))
        mp.setattr(landscape.data, "_sotu_dir", lambda: root / "sotu")
        with pytest.raises(D.DataError, match=r"small\.txt.*fewer than the 16 calibration sequences"):
            run_all.main(argv)
    assert not list(out.rglob("*.h5")) and not list(out.rglob("*.partial"))
