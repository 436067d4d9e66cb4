"""NLL over whole documents in lm-evaluation-harness's convention: word perplexity, byte perplexity and bits
per byte, comparable with the numbers papers report from it.

The toolkit's own NLL (:func:`landscape.objectives.nll`) is a token mean over fixed windows of a token
stream. Papers that use lm-evaluation-harness (its ``wikitext`` task, ``loglikelihood_rolling``) instead score
**every token of every document exactly once** and normalise by words or bytes:

* a document is tokenized on its own, without special tokens; a *prefix token* (the tokenizer's BOS, else its
  EOS) stands before it, so its first token is scored too;
* rolling windows of at most ``max_length`` inputs: the first window is the prefix and the first
  ``max_length - 1`` tokens, scoring the first ``max_length`` tokens; every later window scores the next
  ``max_length`` tokens (fewer at the end) from the ``max_length`` tokens before its last target, so the last,
  partial window sees up to ``max_length`` tokens of context for each of its targets;
* ``word_perplexity = exp(total NLL / words)`` with ``words = len(re.split(r"\\s+", document))`` summed over
  documents, ``byte_perplexity = exp(total NLL / bytes)`` with UTF-8 bytes, ``bits_per_byte = total NLL /
  bytes / ln 2``.

The conversion from a token NLL is therefore ``word ppl = exp(token-mean NLL x tokens / words)`` over the
same documents: :class:`DocumentNLL` carries all four counts, so every figure can be restated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from landscape.weights import model_label, working_dtype

WORD_SPLIT = r"\s+"  # lm-evaluation-harness's word count for wikitext: len(re.split(r"\s+", doc))


@dataclass(frozen=True)
class DocumentNLL:
    """The summed NLL of whole documents with the counts every normalisation needs, and its convention."""

    model: str
    corpus: str
    split: str
    n_documents: int
    max_length: int
    prefix_token: int
    total_nll: float  # nats, summed over every token of every document
    n_tokens: int
    n_words: int
    n_bytes: int
    convention: str = "lm-evaluation-harness loglikelihood_rolling (whole documents, rolling windows)"

    @property
    def token_nll(self) -> float:
        return self.total_nll / self.n_tokens

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.total_nll / self.n_words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.total_nll / self.n_bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.total_nll / self.n_bytes / math.log(2)

    def to_dict(self) -> dict:
        return {**asdict(self), "token_nll": self.token_nll, "word_perplexity": self.word_perplexity,
                "byte_perplexity": self.byte_perplexity, "bits_per_byte": self.bits_per_byte}

    def describe(self) -> str:
        return (f"{self.corpus}/{self.split}, {self.n_documents} whole documents, rolling windows of "
                f"{self.max_length}, prefix token {self.prefix_token}: {self.n_tokens:,} tokens, "
                f"{self.n_words:,} words, {self.n_bytes:,} bytes; word ppl = exp(total NLL / words)")


def count_words(document: str) -> int:
    return len(re.split(WORD_SPLIT, document))


def prefix_token(tokenizer) -> int:
    """lm-evaluation-harness's prefix token: the tokenizer's BOS, else its EOS."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token: the rolling convention needs one to "
                     "stand before each document")


def rolling_windows(n_tokens: int, max_length: int) -> Iterator[tuple[int, int, int]]:
    """The windows over ``[prefix] + tokens`` (``n_tokens`` tokens): ``(start, end, n_scored)``, the inputs
    ``stream[start:end]`` whose last ``n_scored`` positions predict ``stream[end - n_scored + 1 : end + 1]``.
    Every token is scored once."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    first = min(max_length, n_tokens)
    if first:
        yield 0, first, first
    done = first
    while done < n_tokens:
        scored = min(max_length, n_tokens - done)
        end = done + scored  # the inputs end where the last target's context ends
        yield end - max_length, end, scored
        done = end


@torch.no_grad()
def document_nll(model: nn.Module, tokenizer, documents: Sequence[str], max_length: int,
                 corpus: str = "custom", split: str = "heldout", model_name: str | None = None,
                 progress: bool = False) -> DocumentNLL:
    """The summed NLL of ``documents`` in lm-evaluation-harness's rolling convention (module docstring).

    One window per forward pass; log-softmax and sums in float32 or wider (as
    :func:`landscape.objectives.nll`).
    """
    if not documents:
        raise ValueError("no documents to score")
    device = next(model.parameters()).device
    prefix = prefix_token(tokenizer)
    total, tokens_scored, words, n_bytes = 0.0, 0, 0, 0
    for document in tqdm(documents, desc="documents", disable=not progress, leave=False):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        stream = torch.tensor([prefix, *ids], dtype=torch.long, device=device)
        for start, end, scored in rolling_windows(len(ids), max_length):
            logits = model(input_ids=stream[None, start:end]).logits[0, -scored:]
            logp = F.log_softmax(logits.to(working_dtype(logits.dtype)), dim=-1)
            targets = stream[end - scored + 1:end + 1]
            total -= float(logp.gather(-1, targets[:, None]).sum())
        tokens_scored += len(ids)
        words += count_words(document)
        n_bytes += len(document.encode("utf-8"))
    return DocumentNLL(model_label(model, model_name), corpus, split, len(documents), max_length, prefix,
                       total, tokens_scored, words, n_bytes)
