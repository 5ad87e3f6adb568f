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
    meta = prepare("text", tmp_path / "out", source=str(src), min_tokens=10, progress=False)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    for split in ("train", "validation", "test"):
        td = TokenData(tmp_path / "out", split)
        assert len(td) == meta["tokens"][split] > 0
    assert meta["tokens"]["train"] > 50 * meta["tokens"]["validation"]
    # a second call with the same input is skipped (the files are not rewritten)
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    prepare("text", tmp_path / "out", source=str(src), min_tokens=10, progress=False)
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
    meta = prepare("wikitext-103", tmp_path / "out", source=str(folder), min_tokens=10, progress=False)
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
    with pytest.raises(GatelabError, match="fewer than one chunk"):
        prepare("text", tmp_path / "out", source=str(short), progress=False)
    assert not any((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


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
