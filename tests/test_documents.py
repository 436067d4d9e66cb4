"""lm-evaluation-harness's convention (:mod:`landscape.documents`): whole documents in rolling windows, word
perplexity and bits per byte, checked against a brute-force evaluation that gives every token its context by
the rule stated in lm-evaluation-harness's terms, one forward pass per token, in float64.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import tiny_model

from landscape import data as D
from landscape.cli import main as cli_main
from landscape.documents import count_words, document_nll, rolling_windows
from landscape.refmodel import train_tokenizer

DOCUMENTS = ["The river runs past the old mill, and the miller counts his sacks twice.",
             "Naïve café owners — über-careful — keep 3 ledgers.",
             "Short.",
             "A longer document: " + " ".join(f"word{i} follows word{i - 1}." for i in range(1, 12))]


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_tokenizer(D.wiki_documents("train")[:100] + DOCUMENTS, vocab_size=300)
    model = tiny_model("llama", dtype=torch.float64, vocab=len(tokenizer), seed=3)
    return model, tokenizer


def context_of(i: int, n: int, length: int) -> tuple[int, int]:
    """The context of token ``i`` (0-based) of an ``n``-token document as ``(first, last)`` indices of
    ``[prefix] + tokens``: tokens of the first window see the prefix and everything before them; a token
    of a later full window ``k`` (tokens ``k L .. k L + L - 1``) sees the window's inputs from token
    ``k L - 1``; a token of the last, partial window ending at ``n`` sees the ``L`` tokens before ``n``."""
    if i < length:
        return 0, i + 1
    k = i // length
    if (k + 1) * length <= n:  # a full window
        return k * length, i + 1  # stream index k L is token k L - 1
    return n - length, i + 1


@torch.no_grad()
def brute_force(model, tokenizer, document: str, length: int) -> float:
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    stream = [tokenizer.bos_token_id, *ids]
    total = 0.0
    for i in range(len(ids)):
        first, last = context_of(i, len(ids), length)
        assert last - first <= length
        logits = model(input_ids=torch.tensor([stream[first:last]])).logits[0, -1].double()
        total -= float(torch.log_softmax(logits, dim=-1)[stream[i + 1]])
    return total


def test_every_token_is_scored_once_in_windows_no_longer_than_the_limit():
    for n in range(0, 25):
        for length in range(1, 7):
            scored = []
            for start, end, k in rolling_windows(n, length):
                assert 0 <= start < end and end - start <= length and 1 <= k <= end - start
                scored += list(range(end - k, end))  # token indices (stream index - 1) of the targets
            assert scored == list(range(n)), (n, length)


@pytest.mark.parametrize("length", [3, 5, 64])
def test_the_summed_nll_equals_a_brute_force_per_token_evaluation(lm, length):
    model, tokenizer = lm
    result = document_nll(model, tokenizer, DOCUMENTS, length)
    expected = sum(brute_force(model, tokenizer, d, length) for d in DOCUMENTS)
    assert result.total_nll == pytest.approx(expected, rel=1e-10)
    assert result.n_tokens == sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCUMENTS)


def test_words_bytes_and_the_conversions(lm):
    model, tokenizer = lm
    r = document_nll(model, tokenizer, DOCUMENTS, 8)
    words = sum(len(re.split(r"\s+", d)) for d in DOCUMENTS)
    assert r.n_words == words == sum(map(count_words, DOCUMENTS))
    assert r.n_bytes == sum(len(d.encode("utf-8")) for d in DOCUMENTS) > sum(map(len, DOCUMENTS))  # ï, é...
    assert r.word_perplexity == pytest.approx(math.exp(r.token_nll * r.n_tokens / words), rel=1e-12)
    assert r.bits_per_byte == pytest.approx(r.total_nll / r.n_bytes / math.log(2), rel=1e-12)
    assert math.log2(r.byte_perplexity) == pytest.approx(r.bits_per_byte, rel=1e-12)


def test_eval_with_the_lm_eval_convention(lm, tmp_path, capsys):
    model, tokenizer = lm
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    text = tmp_path / "docs.txt"
    copies = [f"{d} Copy {k}." for k in range(80) for d in DOCUMENTS]  # enough for a held-out split
    text.write_text("\n\n".join(copies))
    args = ["eval", str(directory), "--dtype", "float64", "--text", str(text), "--convention", "lm-eval",
            "--documents", "3", "--max-length", "5", "--json"]
    assert cli_main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    held = D.documents(D.text_corpus(text), "heldout")[:3]
    direct = document_nll(model, tokenizer, held, 5)
    assert printed["total_nll"] == pytest.approx(direct.total_nll, rel=1e-9)
    assert (printed["n_words"], printed["n_bytes"]) == (direct.n_words, direct.n_bytes)
    assert printed["max_length"] == 5 and printed["n_documents"] == 3
    assert printed["word_perplexity"] == pytest.approx(direct.word_perplexity, rel=1e-9)
    assert cli_main(["eval", str(directory), "--text", str(text), "--documents", "3"]) == 2
    assert "--documents and --max-length belong to --convention lm-eval" in capsys.readouterr().err
