"""Shared fixtures: tiny random GPT-2, OPT and Llama models built from configs (no downloads).

Every test runs with HF_HUB_OFFLINE=1 and a private LANDSCAPE_CACHE so nothing touches the network or
the user's cache. Tests marked ``slow`` need the bundled corpus or SmolLM2 and are skipped by `make test`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import landscape.data
from landscape.data import TokenSet, token_set_from_tensor
from landscape.models import prepare_model
from landscape.store import RUN_SPECIFIC_KEYS, read_store

VOCAB = 97
SOTU_STANDIN = " ".join(f"Address {i} spoke of the budget, the army, schools and the year {1900 + i}."
                        for i in range(150))


@contextlib.contextmanager
def offline_pipeline(root: Path) -> Iterator[None]:
    """For a module fixture that runs figure or study scripts: a private cache under ``root``, no hub, a
    stand-in for the out-of-domain corpus (two addresses of :data:`SOTU_STANDIN`) and one torch thread; all
    undone on exit."""
    (root / "sotu").mkdir(exist_ok=True)
    for year in (2001, 2002):
        (root / "sotu" / f"{year}.json").write_text(json.dumps({"text": SOTU_STANDIN}))
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDSCAPE_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(landscape.data, "_sotu_dir", lambda: root / "sotu")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def tiny_model(arch: str = "gpt2", dtype: torch.dtype = torch.float32, seed: int = 0, vocab: int = VOCAB,
               hidden: int = 32, layers: int = 2):
    """A tiny randomly initialised causal LM of the given architecture, eval mode, eager attention."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=2)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=2, ffn_dim=2 * hidden,
                        word_embed_proj_dim=hidden)
        model = OPTForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=hidden,
                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=2 * hidden)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return prepare_model(model).to(dtype)


def saved_tiny_llama(directory: Path, arch: str = "llama") -> Path:
    """A tiny model of ``arch`` with a byte-level BPE tokenizer (trained on 200 wiki documents) saved into
    ``directory`` as ``save_pretrained`` writes a user's checkpoint; returns ``directory``."""
    from landscape.data import wiki_documents
    from landscape.refmodel import train_tokenizer

    tokenizer = train_tokenizer(wiki_documents("train")[:200], vocab_size=256)
    tiny_model(arch, vocab=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def random_tokens(n: int = 6, seq_len: int = 16, seed: int = 0, vocab: int = VOCAB) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    return token_set_from_tensor(torch.randint(0, vocab, (n, seq_len), generator=g), name=f"random-{seed}")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and most reproducibly) on one thread; oversubscribed cores make them 100x
    slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path_factory.getbasetemp() / "landscape-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(params=["gpt2", "opt", "llama"])
def arch(request) -> str:
    return request.param


# ------------------------------------------------------------------------------ stores of one computation
WALL_TIMES = ("seconds", "seconds_per_matvec")  # measured, not computed: never equal between two runs


def assert_same_store(path, reference, folders=None):
    """Every array bit for bit (wall times aside) and the provenance but for how the run was executed;
    ``folders=(a, b)``: paths under folder ``a`` in ``path``'s provenance are those under ``b`` in the
    reference's (two runs into two output folders)."""
    got, want = read_store(path), read_store(reference)
    assert got.done.all() and want.done.all()

    def described(data, rename=None):
        text = json.dumps({k: v for k, v in data.provenance.items() if k not in RUN_SPECIFIC_KEYS})
        return json.loads(text.replace(str(rename[0]), str(rename[1])) if rename else text)

    assert described(got, folders) == described(want)
    names = {n for n in want.arrays if n.split("/")[-1] not in WALL_TIMES}
    assert names == {n for n in got.arrays if n.split("/")[-1] not in WALL_TIMES}
    for name in sorted(names):
        a, b = got.arrays[name], want.arrays[name]
        if isinstance(b, str):  # a task's provenance (JSON)
            assert without_wall_times(json.loads(a)) == without_wall_times(json.loads(b)), name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def without_wall_times(value):
    if isinstance(value, dict):
        return {k: without_wall_times(v) for k, v in value.items() if k not in WALL_TIMES}
    return value
