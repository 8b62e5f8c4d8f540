"""`rewarm prepare`: every input kind, the document split, EOS, dtype, no-op reruns, bad input."""
import json

import numpy as np
import pytest

from conftest import assert_user_error, code_files, prose_files, run_cli
from rewarm.data.prepare import prepare
from rewarm.data.shards import TokenShards
from rewarm.errors import UserError
from rewarm.tokenizer import load_tokenizer

DOCS = [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(60)]


def expected_ids(tok, docs):
    eos = tok.eos_token_id
    return [tok(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]


def all_tokens(out):
    sh = TokenShards(out)
    return np.concatenate([np.asarray(sh.split("train")), np.asarray(sh.split("val"))])


def check_against_independent_tokenization(out, tok, docs):
    """train + val hold exactly each document's ids + EOS, split by whole documents."""
    sh = TokenShards(out)
    per_doc = expected_ids(tok, docs)
    assert sh.meta["train"]["tokens"] + sh.meta["val"]["tokens"] == sum(map(len, per_doc))
    assert sh.meta["train"]["documents"] + sh.meta["val"]["documents"] == len(docs)
    assert sorted(all_tokens(out).tolist()) == sorted(t for d in per_doc for t in d)
    train = np.asarray(sh.split("train")).tolist()
    eos = tok.eos_token_id
    # whole documents only: rebuild train by splitting on EOS and look each piece up
    doc_set = {tuple(d) for d in per_doc}
    piece, n_docs = [], 0
    for t in train:
        piece.append(t)
        if t == eos:
            assert tuple(piece) in doc_set
            piece, n_docs = [], n_docs + 1
    assert piece == [] and n_docs == sh.meta["train"]["documents"]


def test_text_files_dirs_and_globs(tmp_path, tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    for i, text in enumerate(DOCS[:20]):
        (d / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(text)
    (d / "extra.md").write_text(DOCS[20])
    prepare([str(d)], str(tokenizer_dir), tmp_path / "out_dir", val_fraction=0.2, progress=False)
    check_against_independent_tokenization(tmp_path / "out_dir", tok, DOCS[:21])
    prepare([str(d / "*.txt")], str(tokenizer_dir), tmp_path / "out_glob", val_fraction=0.2, progress=False)
    assert TokenShards(tmp_path / "out_glob").meta["train"]["documents"] + TokenShards(tmp_path / "out_glob").meta["val"]["documents"] == 10


def test_jsonl_and_parquet(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(str(tokenizer_dir))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(DOCS)) + "\n")
    prepare([str(tmp_path / "d.jsonl")], str(tokenizer_dir), tmp_path / "j", text_field="body", val_fraction=0.1, progress=False)
    check_against_independent_tokenization(tmp_path / "j", tok, DOCS)
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    prepare([str(tmp_path / "d.parquet")], str(tokenizer_dir), tmp_path / "p", val_fraction=0.1, progress=False)
    check_against_independent_tokenization(tmp_path / "p", tok, DOCS)
    # the split is by a hash of the document text: the same documents split the same way
    assert np.array_equal(TokenShards(tmp_path / "j").split("val"), TokenShards(tmp_path / "p").split("val"))


def test_hf_dataset_paths(tmp_path, tokenizer_dir):
    import datasets

    tok = load_tokenizer(str(tokenizer_dir))
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    prepare([], str(tokenizer_dir), tmp_path / "a", hf_dataset=str(tmp_path / "saved"), val_fraction=0.1, progress=False)
    check_against_independent_tokenization(tmp_path / "a", tok, DOCS)
    # `load_dataset` (the hub code path) on a local data directory
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in DOCS))
    prepare([], str(tokenizer_dir), tmp_path / "b", hf_dataset=str(tmp_path / "repo"), val_fraction=0.1, progress=False)
    check_against_independent_tokenization(tmp_path / "b", tok, DOCS)


def test_split_val_tokens_meta_and_dtype(tmp_path, tokenizer_dir):
    files = [str(f) for f in code_files(200_000)]
    meta = prepare(files, str(tokenizer_dir), tmp_path / "o", val_tokens=5000, seed=3, progress=False)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 512
    # whole documents, in hash order, until at least 5000 tokens: without its largest document it falls short
    val = np.asarray(TokenShards(tmp_path / "o").split("val")).tolist()
    ends = [i for i, t in enumerate(val) if t == 0]  # EOS (id 0) closes every document
    doc_lens = np.diff([-1] + ends)
    assert ends[-1] == len(val) - 1 and len(doc_lens) == meta["val"]["documents"]
    assert meta["val"]["tokens"] >= 5000 and meta["val"]["tokens"] - doc_lens.max() < 5000
    assert meta["split"] == {"seed": 3, "val_fraction": None, "val_tokens": 5000, "by": "document"}
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(files)
    assert (tmp_path / "o" / "train.bin").stat().st_size == 2 * meta["train"]["tokens"]
    prepare(files, str(tokenizer_dir), tmp_path / "o2", val_tokens=5000, seed=3, progress=False)
    assert np.array_equal(TokenShards(tmp_path / "o").split("train"), TokenShards(tmp_path / "o2").split("train"))
    other = prepare(files, str(tokenizer_dir), tmp_path / "o3", val_tokens=5000, seed=4, progress=False)
    assert other["val"]["tokens"] != meta["val"]["tokens"] or not np.array_equal(
        TokenShards(tmp_path / "o").split("val"), TokenShards(tmp_path / "o3").split("val"))


def test_rerun_is_noop_unless_overwrite(tmp_path, tokenizer_dir):
    files = [str(f) for f in prose_files(1)]
    prepare(files, str(tokenizer_dir), tmp_path / "o", progress=False)
    stamp = (tmp_path / "o" / "train.bin").stat().st_mtime_ns
    prepare(files, str(tokenizer_dir), tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="--overwrite"):
        prepare(files, str(tokenizer_dir), tmp_path / "o", val_fraction=0.3, progress=False)
    prepare(files, str(tokenizer_dir), tmp_path / "o", val_fraction=0.3, overwrite=True, progress=False)
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["split"]["val_fraction"] == 0.3


def test_non_utf8_and_binary_skipped_with_count_or_strict_fails(tmp_path, tokenizer_dir):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.txt").write_text("good text " * 50)
    (d / "also_good.txt").write_text("more good text " * 50)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    proc = run_cli("prepare", str(d), "-o", str(tmp_path / "o"), "-t", str(tokenizer_dir), "-q")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["skipped"]["non_utf8"] == 1 and meta["skipped"]["binary"] == 1
    assert "skipped" in proc.stdout
    proc = run_cli("prepare", str(d / "good.txt"), str(d / "latin1.txt"), "-o", str(tmp_path / "s"), "-t", str(tokenizer_dir), "-q", "--strict")
    assert_user_error(proc, "latin1.txt is not valid UTF-8", "--strict")
    proc = run_cli("prepare", str(d), "-o", str(tmp_path / "s"), "-t", str(tokenizer_dir), "-q", "--strict")
    assert_user_error(proc, "blob.bin looks binary")
    assert not (tmp_path / "s").exists()
    assert not list(tmp_path.glob(".s.tmp-*"))  # nothing half-written left behind


def test_empty_and_missing_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("   \n")
    proc = run_cli("prepare", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "o"), "-t", str(tokenizer_dir), "-q")
    assert_user_error(proc, "no usable documents")
    assert not (tmp_path / "o").exists()
    proc = run_cli("prepare", str(tmp_path / "nope*.txt"), "-o", str(tmp_path / "o"), "-t", str(tokenizer_dir), "-q")
    assert_user_error(proc, "matches no file")


def test_huge_single_document_is_tokenized_in_pieces(tmp_path, tokenizer_dir):
    from rewarm.data import prepare as prep

    line = "abc def ghi\n" * 250_000  # 3 MB, above the 0.5 MB piece size
    (tmp_path / "big.txt").write_text(line)
    (tmp_path / "small.txt").write_text("small doc " * 10)
    meta = prep.prepare([str(tmp_path)], str(tokenizer_dir), tmp_path / "o", val_fraction=0.0, progress=False)
    tok = load_tokenizer(str(tokenizer_dir))
    piece_ids = tok("abc def ghi\n" * 1000, add_special_tokens=False)["input_ids"]
    assert meta["train"]["tokens"] == len(piece_ids) * 250 + len(tok("small doc " * 10)["input_ids"]) + 2


def test_non_string_text_fields_are_skipped_or_refused(tmp_path, tokenizer_dir):
    """null / 12345 / ["a", "b"] used to be tokenized as the strings 'None', '12345', "['a', 'b']"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = load_tokenizer(str(tokenizer_dir))
    bad = [None, 12345, ["a", "b"], {"x": 1}, True]
    rows = [{"text": t} for t in DOCS[:10]] + [{"text": v} for v in bad]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    meta = prepare([str(tmp_path / "d.jsonl")], str(tokenizer_dir), tmp_path / "j", val_fraction=0.1, progress=False)
    check_against_independent_tokenization(tmp_path / "j", tok, DOCS[:10])
    assert meta["skipped"]["not_text"] == len(bad)
    proc = run_cli("prepare", str(tmp_path / "d.jsonl"), "-o", str(tmp_path / "s"), "-t", str(tokenizer_dir), "-q", "--strict")
    assert_user_error(proc, "d.jsonl:11: field `text` is NoneType")
    assert not (tmp_path / "s").exists()
    for column in ([1, 2, 3], [b"bytes", b"more"], [["a"], ["b", "c"]]):
        pq.write_table(pa.table({"text": column}), tmp_path / "c.parquet")
        meta = prepare([str(tmp_path / "c.parquet"), str(tmp_path / "d.jsonl")], str(tokenizer_dir), tmp_path / "pq",
                       val_fraction=0.1, progress=False, overwrite=True)
        assert meta["skipped"]["not_text"] == len(bad) + len(column)
        check_against_independent_tokenization(tmp_path / "pq", tok, DOCS[:10])


def test_bad_outputs_and_fake_parquet(tmp_path, tokenizer_dir):
    (tmp_path / "fake.parquet").write_text("this is text, not parquet\n")
    proc = run_cli("prepare", str(tmp_path / "fake.parquet"), "-o", str(tmp_path / "o"), "-t", str(tokenizer_dir), "-q")
    assert_user_error(proc, "fake.parquet is not a readable Parquet file")
    (tmp_path / "doc.txt").write_text(DOCS[0])
    (tmp_path / "afile").write_text("x")
    assert_user_error(run_cli("prepare", str(tmp_path / "doc.txt"), "-o", str(tmp_path / "afile"), "-t", str(tokenizer_dir)),
                      "is a file, not a directory")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_user_error(run_cli("prepare", str(tmp_path / "doc.txt"), "-o", str(mine), "-t", str(tokenizer_dir), "--overwrite"),
                      "not a directory written by `rewarm prepare`")
    assert (mine / "notes.txt").read_text() == "keep me"
    prepare([str(tmp_path / "doc.txt")], str(tokenizer_dir), tmp_path / "ok", val_fraction=0.0, progress=False)
    (tmp_path / "ok" / "meta.json").write_text("{ torn")
    assert_user_error(run_cli("prepare", str(tmp_path / "doc.txt"), "-o", str(tmp_path / "ok"), "-t", str(tokenizer_dir)),
                      "already exists")
    assert run_cli("prepare", str(tmp_path / "doc.txt"), "-o", str(tmp_path / "ok"), "-t", str(tokenizer_dir),
                   "--overwrite", "-q").returncode == 2  # a corrupt meta is not proof that rewarm wrote it


def test_large_file_is_streamed_with_the_same_tokens_as_whole(tmp_path, tokenizer_dir, monkeypatch):
    """A plain-text file above the streaming threshold is never read whole (read_bytes / read_text
    are not called on it) and gives exactly the tokens of the whole-document path."""
    from pathlib import Path

    from rewarm.data import sources

    text = "".join(f.read_text() for f in prose_files(3))
    (tmp_path / "big.txt").write_text(text)
    whole = prepare([str(tmp_path / "big.txt")], str(tokenizer_dir), tmp_path / "whole", val_fraction=0.0, progress=False)
    monkeypatch.setattr(sources, "LARGE_FILE_BYTES", 10_000)
    monkeypatch.setattr(sources, "READ_BYTES", 4096)
    real_read = Path.read_bytes

    def guarded(self):
        assert self.name != "big.txt", "a large file was read whole"
        return real_read(self)
    monkeypatch.setattr(Path, "read_bytes", guarded)
    streamed = prepare([str(tmp_path / "big.txt")], str(tokenizer_dir), tmp_path / "stream", val_fraction=0.0, progress=False)
    assert streamed["train"] == whole["train"]
    assert np.array_equal(TokenShards(tmp_path / "stream").split("train"), TokenShards(tmp_path / "whole").split("train"))
    (tmp_path / "bad.txt").write_bytes(text.encode()[:20_000] + b"\xff\xfe" + text.encode()[20_000:40_000])
    meta = prepare([str(tmp_path / "bad.txt"), str(tmp_path / "big.txt")], str(tokenizer_dir), tmp_path / "mixed",
                   val_fraction=0.0, progress=False)
    assert meta["skipped"]["non_utf8"] == 1 and meta["train"] == whole["train"]
