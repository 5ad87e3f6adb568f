"""Corpora, the offline GPT-2 tokenizer, and memory-mapped token files.

`prepare()` turns a corpus into `{train,validation,test}.bin` (uint16 tokens, documents separated by
<|endoftext|>) plus `meta.json`; `TokenData` memory-maps one split for training (random windows that
depend only on (seed, step), so a resumed run reads exactly the batches it would have read) and for
evaluation (non-overlapping chunks covering the whole split).
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .config import GatelabError, atomic_path, write_json
from .progress import progress_bar

ASSETS = Path(__file__).resolve().parent / "assets"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DIR = REPO_ROOT / "data" / "bundled"
GPT2_RANKS = ASSETS / "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256
SPLITS = ("train", "validation", "test")
CORPORA = ("bundled", "wikitext-103", "wikitext-2")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2 BPE through tiktoken, built offline from the committed ranks file (hash-checked)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    digest = sha256_file(GPT2_RANKS)
    if digest != GPT2_RANKS_SHA256:
        raise GatelabError(f"{GPT2_RANKS} has sha256 {digest}, expected {GPT2_RANKS_SHA256}: the file is damaged")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=load_tiktoken_bpe(str(GPT2_RANKS)),
                             special_tokens={"<|endoftext|>": EOT})


# ----------------------------------------------------------------------------------------------------------
# corpus readers: each yields (split, document text)

def read_bundled() -> Iterator[tuple[str, str]]:
    """The committed bundled corpus (see data/bundled/MANIFEST.json), hash-checked."""
    manifest = json.loads((BUNDLED_DIR / "MANIFEST.json").read_text())
    artifact = BUNDLED_DIR / manifest["artifact"]
    if not artifact.is_file():
        raise GatelabError(f"bundled corpus {artifact} is missing (is this a full clone?)")
    if sha256_file(artifact) != manifest["sha256"]:
        raise GatelabError(f"bundled corpus {artifact} does not match the sha256 in its MANIFEST.json")
    with lzma.open(artifact, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield doc["split"], doc["text"]


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise GatelabError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GatelabError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    if not text.strip():
        raise GatelabError(f"{path} is empty")
    return text


WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def read_wikitext(name: str, source: str | None) -> Iterator[tuple[str, str]]:
    """WikiText-103/-2 raw: the standard wiki.{train,valid,test}.raw files, each split one stream."""
    if source:
        folder = Path(source)
        missing = [f for f in WIKITEXT_FILES.values() if not (folder / f).is_file()]
        if missing:
            raise GatelabError(f"{folder} lacks {', '.join(missing)}: point --source at the unzipped "
                               f"{name}-raw folder (wiki.train.raw, wiki.valid.raw, wiki.test.raw)")
        for split, fname in WIKITEXT_FILES.items():
            yield split, _read_utf8(folder / fname)
        return
    try:
        import datasets
    except ImportError:
        raise GatelabError(f"{name}: pass --source DIR holding wiki.train.raw, wiki.valid.raw and wiki.test.raw "
                           f"(from the {name}-raw-v1 zip), or install Hugging Face `datasets` and be online") from None
    try:
        ds = datasets.load_dataset("wikitext", f"{name}-raw-v1")
    except Exception as e:  # noqa: BLE001 - offline, hub errors...
        raise GatelabError(f"{name}: could not load through Hugging Face datasets ({type(e).__name__}); "
                           f"pass --source DIR with the wiki.*.raw files instead") from None
    for split in SPLITS:
        yield split, "".join(ds[split]["text"])


def read_text(source: str) -> Iterator[tuple[str, str]]:
    """Any UTF-8 text file or folder of .txt/.md files: documents in sorted order, the token stream is
    cut 98/1/1 (train/validation/test) at document boundaries where possible."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".raw"))
        if not files:
            raise GatelabError(f"{path} holds no .txt, .md or .raw files")
    elif path.is_file():
        files = [path]
    else:
        raise GatelabError(f"{path} does not exist")
    docs = [_read_utf8(f) for f in files]
    if len(docs) == 1:  # one file: cut it into paragraph blocks so that the split has boundaries to use
        paras = docs[0].split("\n\n")
        step = max(1, len(paras) // 200)
        docs = ["\n\n".join(paras[i:i + step]) for i in range(0, len(paras), step)]
    total = sum(len(d) for d in docs)
    acc = 0
    for d in docs:
        frac = acc / total
        yield ("train" if frac < 0.98 else "validation" if frac < 0.99 else "test"), d
        acc += len(d)


def corpus_documents(corpus: str, source: str | None = None) -> Iterator[tuple[str, str]]:
    if corpus == "bundled":
        return read_bundled()
    if corpus in ("wikitext-103", "wikitext-2"):
        return read_wikitext(corpus, source)
    if corpus == "text":
        if not source:
            raise GatelabError("corpus 'text' needs --source FILE_OR_DIR")
        return read_text(source)
    raise GatelabError(f"unknown corpus {corpus!r}; choose bundled, wikitext-103, wikitext-2 or text")


# ----------------------------------------------------------------------------------------------------------
# prepare: documents -> uint16 token files

def prepare(corpus: str, out_dir: str | Path, source: str | None = None, min_tokens: int = 513,
            force: bool = False, progress: bool = True) -> dict:
    """Tokenise `corpus` into out_dir/{split}.bin + meta.json. Skips work already done for the same input."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    enc = gpt2_tokenizer()
    if enc.n_vocab > 65536:
        raise GatelabError(f"tokenizer vocabulary {enc.n_vocab} does not fit uint16 token files")
    source_id = _source_id(corpus, source)
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("source_id") == source_id and all((out_dir / f"{s}.bin").is_file() for s in SPLITS):
            return meta
    docs: dict[str, list[int]] = {s: [] for s in SPLITS}
    for split, text in progress_bar(corpus_documents(corpus, source), desc=f"tokenising {corpus}", unit="doc",
                            disable=not progress):
        ids = enc.encode_ordinary(text)
        docs[split].extend(ids)
        docs[split].append(EOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        n = len(docs[split])
        if n < min_tokens:
            raise GatelabError(f"{corpus}: the {split} split has {n} tokens, fewer than one chunk ({min_tokens}); "
                               f"use a larger corpus")
        arr = np.asarray(docs[split], dtype=np.int64)
        if arr.max() >= 65536:
            raise GatelabError(f"token id {arr.max()} does not fit uint16")
        with atomic_path(out_dir / f"{split}.bin") as tmp:
            arr.astype(np.uint16).tofile(tmp)
        counts[split] = n
    meta = dict(corpus=corpus, source=str(source) if source else None, source_id=source_id, tokenizer="gpt2",
                vocab_size=enc.n_vocab, eot=EOT, dtype="uint16", tokens=counts)
    write_json(meta_path, meta)
    return meta


def _source_id(corpus: str, source: str | None) -> str:
    """A hash naming the input, so that `prepare` can tell whether its output is current."""
    h = hashlib.sha256(corpus.encode())
    if corpus == "bundled":
        h.update((BUNDLED_DIR / "MANIFEST.json").read_bytes())
    elif source:
        p = Path(source)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# reading token files

def sample_windows(tokens, step: int, batch_size: int, context: int, seed: int, rows: slice | None = None):
    """(inputs, targets) of `batch_size` random `context`-token windows of a token array, a pure function of
    (seed, step): a resumed run reads exactly the batches it would have read. `rows` reads only part of the batch
    (a data-parallel rank's shard), so the global batch is the same whatever the number of ranks."""
    import torch
    rng = np.random.default_rng([seed, step, 0])
    starts = rng.integers(0, len(tokens) - context - 1, size=batch_size)[rows if rows is not None else slice(None)]
    win = torch.from_numpy(np.stack([np.asarray(tokens[s:s + context + 1]) for s in starts]).astype(np.int64))
    return win[:, :-1], win[:, 1:]


class TokenData:
    """One split of a prepared corpus, memory-mapped."""

    def __init__(self, folder: str | Path, split: str):
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise GatelabError(f"{folder} is not a prepared corpus (no meta.json): run `gatelab prepare` first")
        self.meta = json.loads(meta_path.read_text())
        path = folder / f"{split}.bin"
        if split not in SPLITS or not path.is_file():
            raise GatelabError(f"{folder} has no {split!r} split")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.split = split
        self.vocab_size = int(self.meta["vocab_size"])

    def __len__(self) -> int:
        return len(self.tokens)

    def _check(self, context: int) -> None:
        if len(self.tokens) < context + 1:
            raise GatelabError(f"the {self.split} split has {len(self.tokens)} tokens, fewer than one chunk "
                               f"of {context + 1}")

    def batch(self, step: int, batch_size: int, context: int, seed: int, rows: slice | None = None):
        """Random windows for training step `step`; a pure function of (seed, step). rows: see sample_windows."""
        self._check(context)
        return sample_windows(self.tokens, step, batch_size, context, seed, rows)

    def chunks(self, context: int, max_tokens: int = 0) -> Iterable[tuple]:
        """Non-overlapping evaluation chunks: every token after the first is predicted exactly once.
        The last chunk may be shorter. `max_tokens` > 0 stops after about that many predicted tokens."""
        import torch
        self._check(1)
        n = len(self.tokens) - 1
        if max_tokens:
            n = min(n, max_tokens)
        for start in range(0, n, context):
            end = min(start + context, n)
            win = torch.from_numpy(self.tokens[start:end + 1].astype(np.int64))
            yield win[:-1], win[1:]

    def n_eval_tokens(self, max_tokens: int = 0) -> int:
        n = len(self.tokens) - 1
        return min(n, max_tokens) if max_tokens else n
