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
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from gatelab.config import GatelabError, follow_umask, write_json
from gatelab.progress import progress_bar

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

    digest = sha256_file(GPT2_RANKS)
    if digest != GPT2_RANKS_SHA256:
        raise GatelabError(f"{GPT2_RANKS} has sha256 {digest}, expected {GPT2_RANKS_SHA256}: the file is damaged")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=load_tiktoken_bpe(str(GPT2_RANKS)),
                             special_tokens={"<|endoftext|>": EOT})


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


def normalise_text(text: str) -> str:
    """Text as the tokenizer should see it: no byte-order mark (U+FEFF, at the start or inside, where files that
    each began with one were concatenated), and CRLF / lone CR line ends turned into LF (so that a file saved on
    Windows tokenises like the same file saved on Linux)."""
    return text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise GatelabError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GatelabError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})") from None
    text = normalise_text(text)
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
        yield split, normalise_text("".join(ds[split]["text"]))


def read_text(source: str) -> Iterator[tuple[str, str]]:
    """Any UTF-8 text file or folder of .txt/.md files: documents in sorted order, assigned 98/1/1
    (train/validation/test, by characters) at document boundaries. `prepare` cuts the token stream instead when
    these document splits are too small for the context (see split_tokens)."""
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
    """(split, text) of every document; a missing source is reported here, before any reading starts."""
    if corpus == "bundled":
        return read_bundled()
    if corpus in ("wikitext-103", "wikitext-2"):
        if source and not Path(source).is_dir():
            raise GatelabError(f"{source} is not a folder: point --source at the unzipped {corpus}-raw folder "
                               f"(wiki.train.raw, wiki.valid.raw, wiki.test.raw)")
        return read_wikitext(corpus, source)
    if corpus == "text":
        if not source:
            raise GatelabError("corpus 'text' needs --source FILE_OR_DIR")
        if not Path(source).exists():
            raise GatelabError(f"{source} does not exist")
        return read_text(source)
    raise GatelabError(f"unknown corpus {corpus!r}; choose bundled, wikitext-103, wikitext-2 or text")


FIXED_SPLITS = ("bundled", "wikitext-103", "wikitext-2")  # corpora whose documents come with their split


TOKEN_CUT = (0.98, 0.01, 0.01)  # fractions of a token-cut stream (text corpora too small to split by document)


def split_tokens(corpus: str, docs: list[tuple[str, list[int]]], eot: int | None, context: int) -> tuple[dict, str]:
    """The token stream of each split, from tokenised documents (each followed by `eot` when not None), and how
    it was cut: "document" or "tokens".

    Training at `context` needs a train split of at least one window (context + 1 tokens) and validation and
    test splits of at least one predicted token (2 tokens; evaluation reads non-overlapping chunks, the last one
    may be short). Corpora with given splits (bundled, WikiText) keep them. A text corpus keeps its document
    splits when each of them holds a full window; otherwise (too few or too long documents, e.g. one document)
    its token stream is cut into train / validation / test ranges: 98/1/1, but validation and test get a full
    window each where the corpus is large enough for that and the train split keeps one."""
    need = context + 1
    streams: dict[str, list[int]] = {s: [] for s in SPLITS}
    for split, ids in docs:
        streams[split].extend(ids)
        if eot is not None:
            streams[split].append(eot)
    if corpus in FIXED_SPLITS or all(len(streams[s]) >= need for s in SPLITS):
        how = "document"
    else:
        stream = [t for s in SPLITS for t in streams[s]]
        n = len(stream)
        room = (n - need) // 2  # the most validation and test may each take while train keeps one window
        held = min(max(round(TOKEN_CUT[1] * n), min(need, room)), room)
        if held < 2:
            raise GatelabError(f"{corpus}: {n:,} tokens in all, too few to train at context {context}: the train "
                               f"split needs {need:,} tokens (one window) and validation and test 2 each, "
                               f"{need + 4:,} in all; use a larger corpus or a smaller --context")
        train_n = n - 2 * held
        streams = dict(train=stream[:train_n], validation=stream[train_n:train_n + held],
                       test=stream[train_n + held:])
        how = "tokens"
    check_split_sizes(corpus, {s: len(v) for s, v in streams.items()}, context)
    return streams, how


def check_split_sizes(where: str, counts: dict, context: int) -> None:
    """Raise a clear error unless the splits can train at `context` (see split_tokens)."""
    if counts["train"] < context + 1:
        raise GatelabError(f"{where}: the train split has {counts['train']:,} tokens, fewer than one training window "
                           f"at context {context} ({context + 1:,} tokens); use a larger corpus or a smaller context "
                           f"(gatelab prepare --context, model.context)")
    for split in ("validation", "test"):
        if counts[split] < 2:
            raise GatelabError(f"{where}: the {split} split has {counts[split]} tokens, nothing to evaluate (it needs "
                               f"at least 2); use a larger corpus")


def _is_current(meta: dict, source_id: str, out_dir: Path, context: int) -> bool:
    """Whether a prepared folder is what prepare(context=...) would write now."""
    if meta.get("source_id") != source_id or not all((out_dir / f"{s}.bin").is_file() for s in SPLITS):
        return False
    if meta.get("split_by", "document") == "tokens":  # the cut depends on the context
        return meta.get("context") == context
    counts = meta.get("tokens", {})
    if meta.get("corpus") in FIXED_SPLITS:
        return counts.get("train", 0) >= context + 1 and min(counts.get("validation", 0), counts.get("test", 0)) >= 2
    return all(counts.get(s, 0) >= context + 1 for s in SPLITS)  # document splits are kept at this context too


def prepare(corpus: str, out_dir: str | Path, source: str | None = None, context: int = 512,
            force: bool = False, progress: bool = True) -> dict:
    """Tokenise `corpus` into out_dir/{split}.bin + meta.json, checked to be large enough to train at `context`
    (see split_tokens). Skips work already done for the same input. Writes into a temporary folder beside
    out_dir and moves the files in at the end (meta.json last): a failed prepare leaves nothing behind."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise GatelabError(f"--context must be an integer >= 1, got {context!r}")
    out_dir = Path(out_dir)
    meta_path = out_dir / "meta.json"
    enc = gpt2_tokenizer()
    if enc.n_vocab > 65536:
        raise GatelabError(f"tokenizer vocabulary {enc.n_vocab} does not fit uint16 token files")
    source_id = _source_id(corpus, source)
    if meta_path.is_file() and not force:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if _is_current(meta, source_id, out_dir, context):
            if not isinstance(meta.get("fingerprint"), dict):  # prepared before fingerprints: record it now
                meta["fingerprint"] = folder_fingerprint(out_dir, meta)
                write_json(meta_path, meta)
            return meta
    docs = [(split, enc.encode_ordinary(text)) for split, text in
            progress_bar(corpus_documents(corpus, source), desc=f"tokenising {corpus}", unit="doc",
                         disable=not progress)]
    streams, how = split_tokens(corpus, docs, EOT, context)
    del docs
    arrays = {}
    for split in SPLITS:
        arr = np.asarray(streams[split], dtype=np.int64)
        if arr.max() >= 65536:
            raise GatelabError(f"token id {arr.max()} does not fit uint16")
        arrays[split] = arr.astype(np.uint16)
    meta = dict(corpus=corpus, source=str(source) if source else None, source_id=source_id, tokenizer="gpt2",
                vocab_size=enc.n_vocab, eot=EOT, dtype="uint16", tokens={s: len(a) for s, a in arrays.items()},
                split_by=how, context=context)
    meta["fingerprint"] = fingerprint_of(meta, {s: hashlib.sha256(a.tobytes()).hexdigest() for s, a in arrays.items()})
    if not force:
        refuse_overwrite(out_dir, meta["fingerprint"])
    _write_prepared(out_dir, arrays, meta)
    return meta


def prepared_folder(corpus: str, source: str | None = None, name: str | None = None) -> Path:
    """Where `gatelab prepare` writes a corpus by default: data/prepared/NAME when a name is given, else
    data/prepared/bundled (and data/prepared/wikitext-103 etc. read through Hugging Face), else, for a source
    folder or file, data/prepared/CORPUS-HASH with HASH a short hash of the source's absolute path: each source
    gets its own folder, so preparing a second one never replaces the first."""
    root = Path("data") / "prepared"
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise GatelabError(f"--name must be a plain folder name (no '/'), got {name!r}")
        return root / name
    if corpus == "bundled" or not source:
        return root / corpus
    return root / f"{corpus}-{hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]}"


def fingerprint_of(meta: dict, sha256: dict) -> dict:
    """The fingerprint of prepared data: what it is (corpus, source, tokenizer, split sizes) and the sha256 of each
    token file. `id` hashes the tokenizer and the token files only: the same tokens prepared from a source that
    moved keep their id."""
    h = hashlib.sha256(str(meta.get("tokenizer")).encode())
    for split in SPLITS:
        h.update(f"\n{split}:{sha256.get(split)}".encode())
    return dict(id=h.hexdigest()[:16], corpus=meta.get("corpus"), source=meta.get("source"),
                tokenizer=meta.get("tokenizer"), tokens=meta.get("tokens"), sha256=dict(sha256))


def folder_fingerprint(folder: str | Path, meta: dict | None = None) -> dict:
    """The fingerprint a prepared folder's meta.json records, or, for folders prepared before fingerprints were
    recorded, the one computed from its token files."""
    folder = Path(folder)
    if meta is None:
        meta = json.loads((folder / "meta.json").read_text())
    if isinstance(meta.get("fingerprint"), dict) and meta["fingerprint"].get("id"):
        return meta["fingerprint"]
    return fingerprint_of(meta, {s: sha256_file(folder / f"{s}.bin") if (folder / f"{s}.bin").is_file() else None
                                 for s in SPLITS})


def describe_data(fp: dict) -> str:
    """'text from /x/book.txt, 12,345 train tokens, fingerprint 0123abcd...' for messages."""
    train = (fp.get("tokens") or {}).get("train")
    return (f"{fp.get('corpus')}" + (f" from {fp['source']}" if fp.get("source") else "")
            + (f", {train:,} train tokens" if isinstance(train, int) else "") + f", fingerprint {fp.get('id')}")


def refuse_overwrite(out_dir: Path, new: dict) -> None:
    """Refuse to replace a prepared folder that holds other tokens than `new` (a fingerprint) would write."""
    if not (out_dir / "meta.json").is_file():
        return
    try:
        old = folder_fingerprint(out_dir)
    except (OSError, ValueError):
        return  # not a readable prepared corpus: nothing a run could have been trained on
    if old["id"] != new["id"]:
        raise GatelabError(f"{out_dir} already holds other prepared data ({describe_data(old)}); runs trained on it "
                           f"would no longer match it: prepare into another folder (--name NAME or --out DIR), or "
                           f"pass --force to replace it")


def check_same_data(recorded: dict | None, data: "TokenData", what: str, allow: bool = False) -> None:
    """Refuse `data` when `what` (a checkpoint, a gate) records a fingerprint of other data; with `allow`, warn
    instead. Checkpoints and gates made before fingerprints were recorded are accepted as they are."""
    if not isinstance(recorded, dict) or not recorded.get("id"):
        return
    now = data.fingerprint
    if recorded["id"] == now["id"]:
        return
    msg = (f"{data.folder} is not the data {what} was trained on (trained on {describe_data(recorded)}; "
           f"{data.folder} holds {describe_data(now)})")
    if not allow:
        raise GatelabError(msg + ": pass --data FOLDER with that data, or --allow-other-data to use this anyway")
    print(f"gatelab: WARNING: {msg}; using it anyway because --allow-other-data was given", file=sys.stderr)


def _write_prepared(out_dir: Path, arrays: dict, meta: dict) -> None:
    """Write the token files and meta.json into a temporary folder beside out_dir, then move them in."""
    created = [p for p in [out_dir, *out_dir.parents] if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for split, arr in arrays.items():
            arr.tofile(tmp / f"{split}.bin")
            follow_umask(tmp / f"{split}.bin")
        write_json(tmp / "meta.json", meta)
        follow_umask(tmp, directory=True)
        if not out_dir.exists():
            os.replace(tmp, out_dir)  # one rename publishes the whole folder
            return
        (out_dir / "meta.json").unlink(missing_ok=True)  # a half-moved folder is then no prepared corpus
        for split in SPLITS:
            os.replace(tmp / f"{split}.bin", out_dir / f"{split}.bin")
        os.replace(tmp / "meta.json", out_dir / "meta.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created[1:]:  # parents this call created, innermost first, when still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_id(corpus: str, source: str | None) -> str:
    """A hash naming the input, so that `prepare` can tell whether its output is current."""
    h = hashlib.sha256(corpus.encode())
    if corpus == "bundled":
        h.update((BUNDLED_DIR / "MANIFEST.json").read_bytes())
        return h.hexdigest()[:16]
    h.update(b"normalised-text-v3")  # text read since every BOM and CR line end is normalised: prepared again once
    if source:
        p = Path(source)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat() if f.exists() else None
            h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


def sample_windows(tokens, step: int, batch_size: int, context: int, seed: int, rows: slice | None = None):
    """(inputs, targets) of `batch_size` random `context`-token windows of a token array, a pure function of
    (seed, step): a resumed run reads exactly the batches it would have read. `rows` reads only part of the batch
    (a data-parallel rank's shard), so the global batch is the same whatever the number of ranks."""
    rng = np.random.default_rng([seed, step, 0])
    # starts < len - context - 1 (kept so that batches stay what they were); a split of exactly one window has one
    starts = rng.integers(0, max(1, len(tokens) - context - 1), size=batch_size)
    starts = starts[rows if rows is not None else slice(None)]
    win = torch.from_numpy(np.stack([np.asarray(tokens[s:s + context + 1]) for s in starts]).astype(np.int64))
    return win[:, :-1], win[:, 1:]


class TokenData:
    """One split of a prepared corpus, memory-mapped; `fraction` < 1 keeps only the first share of its tokens."""

    def __init__(self, folder: str | Path, split: str, fraction: float = 1.0):
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            where = folder.resolve()
            raise GatelabError(f"{where} is not a prepared corpus (no meta.json): prepare it there (`gatelab prepare "
                               f"--out {where}`, with --corpus and --source for your own text), or name the folder "
                               f"`gatelab prepare` printed")
        self.meta = json.loads(meta_path.read_text())
        path = folder / f"{split}.bin"
        if split not in SPLITS or not path.is_file():
            raise GatelabError(f"{folder} has no {split!r} split")
        if path.stat().st_size < 2:
            raise GatelabError(f"{path} holds no tokens: prepare the corpus again (gatelab prepare --force)")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if fraction < 1.0:
            self.tokens = self.tokens[:max(1, int(len(self.tokens) * fraction))]
        self.split, self.folder = split, folder
        self.vocab_size = int(self.meta["vocab_size"])

    def __len__(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def fingerprint(self) -> dict:
        """Which tokens this prepared folder holds (folder_fingerprint)."""
        return folder_fingerprint(self.folder, self.meta)

    def _check(self, context: int) -> None:
        if len(self.tokens) < context + 1:
            raise GatelabError(f"the {self.split} split of {self.folder} has {len(self.tokens):,} tokens, fewer than "
                               f"one window of {context + 1:,} (context {context}): use a smaller model.context, or "
                               f"a larger corpus (gatelab prepare --context {context} checks this)")

    def check_trainable(self, context: int) -> None:
        """Raise a clear error unless this split can be trained on (train) or evaluated (other splits) at context."""
        self._check(context if self.split == "train" else 1)

    def batch(self, step: int, batch_size: int, context: int, seed: int, rows: slice | None = None):
        """Random windows for training step `step`; a pure function of (seed, step). rows: see sample_windows."""
        self._check(context)
        return sample_windows(self.tokens, step, batch_size, context, seed, rows)

    def chunks(self, context: int, max_tokens: int = 0) -> Iterable[tuple]:
        """Non-overlapping evaluation chunks: every token after the first is predicted exactly once.
        The last chunk may be shorter. `max_tokens` > 0 stops after about that many predicted tokens."""
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
