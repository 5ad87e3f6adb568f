"""Tokenizer, corpora, prepare, and memory-mapped token files."""
import json

import numpy as np
import pytest

import gatelab.data as data
from gatelab.config import GatelabError
from gatelab.data import TokenData, gpt2_tokenizer, prepare


def test_gpt2_tokenizer_offline():
    enc = gpt2_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257
    assert enc.decode([15496, 995]) == "Hello world"


def test_tokenizer_hash_is_checked(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(data.GPT2_RANKS.read_bytes()[:-10])
    monkeypatch.setattr(data, "GPT2_RANKS", bad)
    data.gpt2_tokenizer.cache_clear()
    try:
        with pytest.raises(GatelabError, match="sha256"):
            data.gpt2_tokenizer()
    finally:
        data.gpt2_tokenizer.cache_clear()


def test_bundled_manifest_matches_artifact():
    manifest = json.loads((data.BUNDLED_DIR / "MANIFEST.json").read_text())
    assert data.sha256_file(data.BUNDLED_DIR / manifest["artifact"]) == manifest["sha256"]
    splits = manifest["splits"]
    total = sum(s["tokens"] for s in splits.values())
    assert 0.005 < splits["validation"]["tokens"] / total < 0.02
    assert 0.005 < splits["test"]["tokens"] / total < 0.02
    assert set(manifest["sources"]) == {"sotu", "shakespeare", "milton", "brown", "austen", "wikipedia",
                                        "moby-dick"}


def test_bundled_documents_are_in_exactly_one_split():
    import lzma
    manifest = json.loads((data.BUNDLED_DIR / "MANIFEST.json").read_text())
    seen = {}
    with lzma.open(data.BUNDLED_DIR / manifest["artifact"], "rt") as f:
        for line in f:
            doc = json.loads(line)
            assert doc["id"] not in seen
            seen[doc["id"]] = doc["split"]
    assert len(seen) == manifest["documents"]
    assert set(seen.values()) == {"train", "validation", "test"}


def _text(n_paragraphs=400):
    return "\n\n".join(f"Paragraph {i} tells of the sea and the ship and the whale, number {i}." for i in
                       range(n_paragraphs))


def test_prepare_text_file(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(_text())
    meta = prepare("text", tmp_path / "out", source=str(src), context=9, progress=False)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2" and meta["split_by"] == "document"
    for split in ("train", "validation", "test"):
        td = TokenData(tmp_path / "out", split)
        assert len(td) == meta["tokens"][split] > 0
    assert meta["tokens"]["train"] > 50 * meta["tokens"]["validation"]
    # a second call with the same input is skipped (the files are not rewritten)
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    prepare("text", tmp_path / "out", source=str(src), context=9, progress=False)
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime


WIKITEXT_SAMPLE = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical "
                   "role @-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . "
                   "\n \n = = Gameplay = = \n \n As with previous Valkyira Chronicles games , the game is a tactical "
                   "role @-@ playing game where players take control of a military unit . \n")


def test_wikitext_raw_reader(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    folder.mkdir()
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (folder / name).write_text(WIKITEXT_SAMPLE * (20 if "train" in name else 3), encoding="utf-8")
    meta = prepare("wikitext-103", tmp_path / "out", source=str(folder), context=9, progress=False)
    enc = gpt2_tokenizer()
    assert meta["tokens"]["validation"] == len(enc.encode_ordinary(WIKITEXT_SAMPLE * 3)) + 1  # + <|endoftext|>
    td = TokenData(tmp_path / "out", "validation")
    assert enc.decode(td.tokens[:-1].tolist()) == WIKITEXT_SAMPLE * 3


def test_wikitext_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(GatelabError, match="wiki.train.raw"):
        list(data.read_wikitext("wikitext-103", str(tmp_path)))


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"ok \xff\xfe bad", "not valid UTF-8")])
def test_bad_text_input(tmp_path, content, match):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    with pytest.raises(GatelabError, match=match):
        prepare("text", tmp_path / "out", source=str(src), progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_source_and_short_corpus(tmp_path):
    with pytest.raises(GatelabError, match="does not exist"):
        prepare("text", tmp_path / "out", source=str(tmp_path / "nope.txt"), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n\nAnd a second paragraph.")
    with pytest.raises(GatelabError, match="too few to train at context 512"):
        prepare("text", tmp_path / "data" / "prepared" / "text", source=str(short), progress=False)
    assert list(tmp_path.iterdir()) == [short], "a failed prepare leaves nothing behind (no empty folders)"


def test_batches_are_a_pure_function_of_seed_and_step(token_corpus):
    td = TokenData(token_corpus, "train")
    x1, y1 = td.batch(7, 4, 16, seed=3)
    x2, y2 = td.batch(7, 4, 16, seed=3)
    x3, _ = td.batch(8, 4, 16, seed=3)
    assert (x1 == x2).all() and (y1 == y2).all() and not (x1 == x3).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()


def test_eval_chunks_predict_every_token_once(token_corpus):
    td = TokenData(token_corpus, "validation")
    chunks = list(td.chunks(64))
    targets = np.concatenate([c[1].numpy() for c in chunks])
    assert len(targets) == len(td) - 1
    assert (targets == td.tokens[1:]).all()
    assert sum(c[1].numel() for c in td.chunks(64, max_tokens=1000)) == 1000


def test_unprepared_folder_is_a_clear_error(tmp_path):
    with pytest.raises(GatelabError, match="gatelab prepare"):
        TokenData(tmp_path, "train")


def _wikitext_folder(folder, train_copies, held_copies):
    folder.mkdir()
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        (folder / name).write_text(WIKITEXT_SAMPLE * (train_copies if "train" in name else held_copies),
                                   encoding="utf-8")
    return folder


def test_small_wikitext_with_short_evaluation_splits_prepares(tmp_path):
    """A well-formed WikiText folder whose validation split is shorter than one chunk (here ~400 tokens) keeps its
    splits and prepares: evaluation reads a short chunk. Only the train split needs a whole window."""
    folder = _wikitext_folder(tmp_path / "wikitext-2-raw", train_copies=40, held_copies=4)
    meta = prepare("wikitext-2", tmp_path / "out", source=str(folder), progress=False)
    assert meta["split_by"] == "document" and 300 < meta["tokens"]["validation"] < 513 < meta["tokens"]["train"]
    assert len(TokenData(tmp_path / "out", "validation")) == meta["tokens"]["validation"]
    # a train split shorter than a window for the context asked for is refused, and nothing is written
    with pytest.raises(GatelabError, match="fewer than one training window at context 4096"):
        prepare("wikitext-2", tmp_path / "out2", source=str(folder), context=4096, progress=False)
    assert not (tmp_path / "out2").exists()


def test_one_long_document_is_cut_by_tokens(tmp_path):
    """One ~1,000-token document with no blank lines: the token stream is cut into train / validation / test
    ranges (train keeps one full window, validation and test share the rest), in order, nothing lost."""
    text = " ".join(f"word{i} of the long line" for i in range(180))
    src = tmp_path / "one.txt"
    src.write_text(text)
    enc = gpt2_tokenizer()
    n = len(enc.encode_ordinary(text)) + 1
    assert 1000 < n < 3 * 513
    meta = prepare("text", tmp_path / "out", source=str(src), progress=False)
    tokens = meta["tokens"]
    assert meta["split_by"] == "tokens" and meta["context"] == 512
    held = (n - 513) // 2  # validation and test take what train's one window leaves
    assert tokens == dict(train=n - 2 * held, validation=held, test=held)
    stream = np.concatenate([TokenData(tmp_path / "out", s).tokens for s in ("train", "validation", "test")])
    assert enc.decode(stream[:-1].tolist()) == text and stream[-1] == data.EOT
    # at a small context: 98/1/1 by tokens (validation and test at least one window each)
    meta = prepare("text", tmp_path / "small", source=str(src), context=8, progress=False)
    held = max(round(0.01 * n), 9)
    assert meta["split_by"] == "tokens" and meta["tokens"] == dict(train=n - 2 * held, validation=held, test=held)
    # and the 512-context corpus trains a 512-context model
    from gatelab.training.train import train
    from tests.conftest import tiny_model_config, tiny_train_config
    model = tiny_model_config(vocab_size=50257, context=512, d_model=16, n_head=2, d_mlp=16, n_layer=1)
    cfg = tiny_train_config(tmp_path / "out", steps=2, batch_size=1, model=model)
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 2


def test_many_small_documents_keep_the_document_split_when_it_is_large_enough(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:03d}.txt").write_text(f"Document {i} is about a ship and a whale. " * 3)
    meta = prepare("text", tmp_path / "out", source=str(folder), context=16, progress=False)
    assert meta["split_by"] == "document" and min(meta["tokens"].values()) >= 17
    # at context 512 the 1% splits are too small for a window: cut by tokens, one window each (other tokens than
    # the folder holds: replacing them takes force=True)
    with pytest.raises(GatelabError, match="already holds other prepared data"):
        prepare("text", tmp_path / "out", source=str(folder), context=512, progress=False)
    meta = prepare("text", tmp_path / "out", source=str(folder), context=512, progress=False, force=True)
    assert meta["split_by"] == "tokens" and meta["tokens"]["validation"] == meta["tokens"]["test"] == 513


@pytest.mark.parametrize("corpus", ["text", "wikitext-103"])
def test_bom_and_crlf_are_normalised(tmp_path, corpus):
    """A UTF-8 file saved with a byte-order mark and CRLF (or lone CR) line ends tokenises exactly like the same
    text with LF line ends: no U+FEFF, no carriage returns."""
    text = _text(60).replace("\n\n", "\n \n")
    enc = gpt2_tokenizer()

    def write(folder, raw: bytes):
        folder.mkdir()
        names = ["book.txt"] if corpus == "text" else ["wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"]
        for name in names:
            (folder / name).write_bytes(raw)
        return prepare(corpus, folder / "out", source=str(folder / names[0] if corpus == "text" else folder),
                       context=9, progress=False)

    lf = write(tmp_path / "lf", text.encode())
    crlf = write(tmp_path / "crlf", b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    cr = write(tmp_path / "cr", text.replace("\n", "\r").encode())
    assert lf["tokens"] == crlf["tokens"] == cr["tokens"]
    for split in ("train", "validation", "test"):
        ref = TokenData(tmp_path / "lf" / "out", split).tokens
        for other in ("crlf", "cr"):
            toks = TokenData(tmp_path / other / "out", split).tokens
            assert np.array_equal(toks, ref), (other, split)
            decoded = enc.decode(toks.tolist())
            assert "\ufeff" not in decoded and "\r" not in decoded


def test_failed_write_leaves_nothing_and_a_rewrite_keeps_other_files(tmp_path, monkeypatch):
    src = tmp_path / "book.txt"
    src.write_text(_text())
    out = tmp_path / "prepared" / "text"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data, "write_json", boom)
    with pytest.raises(OSError):
        prepare("text", out, source=str(src), context=9, progress=False)
    assert list(tmp_path.iterdir()) == [src]
    monkeypatch.undo()
    prepare("text", out, source=str(src), context=9, progress=False)
    (out / "notes.md").write_text("mine")
    src.write_text(_text(300))  # another input: prepared again into the same folder (force: it replaces data)
    meta = prepare("text", out, source=str(src), context=9, progress=False, force=True)
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "notes.md", "test.bin", "train.bin",
                                                     "validation.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert not list(out.parent.glob(".*")), "no temporary folder is left beside the output"



def test_token_files_follow_the_umask(tmp_path):
    """The token files and their folder get the umask's modes, not tempfile's private 0600 / 0700."""
    import os
    src = tmp_path / "book.txt"
    src.write_text(_text())
    old = os.umask(0o022)
    try:
        prepare("text", tmp_path / "out", source=str(src), context=9, progress=False)
        os.umask(0o002)
        prepare("text", tmp_path / "again", source=str(src), context=9, progress=False)
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "out") == 0o755 and mode(tmp_path / "again") == 0o775
    assert {mode(f) for f in (tmp_path / "out").iterdir()} == {0o644}
    assert {mode(f) for f in (tmp_path / "again").iterdir()} == {0o664}


def test_a_corpus_too_small_for_the_context_is_refused_before_training(tmp_path, capsys):
    from gatelab.training.train import train
    from tests.conftest import tiny_train_config, write_token_corpus
    small = write_token_corpus(tmp_path / "small", n_train=32, n_val=3, n_test=3)
    cfg = tiny_train_config(small)  # context 32: one window needs 33 tokens
    with pytest.raises(GatelabError, match="fewer than one window of 33"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    # exactly one window trains (its only window, every step)
    exact = write_token_corpus(tmp_path / "exact", n_train=33, n_val=3, n_test=3)
    assert train(tiny_train_config(exact, steps=2), tmp_path / "run2", progress=False)["steps"] == 2
