"""Corpora tokenised by a Hugging Face tokenizer, cached per tokenizer, and long documents for long-context evaluation."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from gatelab.config import GatelabError, atomic_path
from gatelab.data import REPO_ROOT, _source_id, corpus_documents, split_tokens
from gatelab.hf.gate_files import tokenizer_fingerprint
from gatelab.progress import progress_bar


def encode_long_documents(tokenizer, context: int, corpus: str = "bundled", split: str = "validation",
                          source: str | None = None) -> list[list[int]]:
    """The documents of a corpus split with at least context + 1 tokens (the model's own tokenizer), each cut to
    its whole `context`-token windows plus the one token the last window predicts: every window lies inside
    one document."""
    docs = []
    for doc_split, text in corpus_documents(corpus, source):
        if doc_split != split:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = (len(ids) - 1) // context
        if n >= 1:
            docs.append(ids[:n * context + 1])
    if not docs:
        raise GatelabError(f"{corpus} has no {split} document of more than {context} tokens")
    return docs


def token_cache_dir() -> Path:
    """Where tokenised corpora are cached: $GATELAB_TOKEN_CACHE, else data/prepared/hf-tokens in the project."""

    return Path(os.environ.get("GATELAB_TOKEN_CACHE") or REPO_ROOT / "data" / "prepared" / "hf-tokens")


def encode_corpus(tokenizer, corpus: str = "bundled", split: str = "validation", source: str | None = None,
                  context: int = 512, progress: bool = False) -> list:
    """A corpus split tokenised with the model's own tokenizer, documents separated by its EOS token. A text
    corpus is split as `gatelab prepare` splits it for `context` (by document, or by tokens when its documents
    are too few or too long: data.split_tokens). Cached per tokenizer (tokenizer_fingerprint) and input (the
    corpus's source id) under token_cache_dir(), so only the first call per tokenizer pays for tokenising."""

    tok_id = tokenizer_fingerprint(tokenizer)
    cache = None
    if tok_id is not None:
        key = hashlib.sha256(f"v1|{tok_id}|{corpus}|{_source_id(corpus, source)}|{split}|"
                             f"{context if corpus == 'text' else ''}".encode()).hexdigest()[:16]
        cache = token_cache_dir() / f"{corpus}-{split}-{key}.npy"
        if cache.is_file():
            try:
                return np.load(cache).tolist()
            except (OSError, ValueError):
                pass  # damaged: tokenised again below
    ids = _encode_split(tokenizer, corpus, split, source, context, progress)
    if cache is not None:
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(ids, dtype=np.int64))
        except (OSError, GatelabError):
            pass  # a read-only project: the corpus is tokenised again next time
    return ids


def _encode_split(tokenizer, corpus: str, split: str, source: str | None, context: int, progress: bool) -> list:
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    docs = progress_bar(corpus_documents(corpus, source), desc=f"tokenising {corpus} (once per tokenizer)",
                        unit="doc", disable=not progress)
    if corpus == "text":
        return split_tokens(corpus, [(doc_split, encode(text)) for doc_split, text in docs], eos, context)[0][split]
    ids: list[int] = []
    for doc_split, text in docs:
        if doc_split == split:
            ids.extend(encode(text))
            if eos is not None:
                ids.append(eos)
    if len(ids) < 2:
        raise GatelabError(f"{corpus} has no {split} text")
    return ids
