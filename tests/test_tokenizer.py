from transformers import AutoTokenizer

from conftest import code_files, run_cli
from rewarm.tokenizer import fingerprint, load_tokenizer


def test_cli_trains_deterministic_bpe_with_eos(tmp_path):
    files = [str(f) for f in code_files(80_000)]
    for out in ("a", "b"):
        proc = run_cli("tokenizer", "train", *files, "-o", str(tmp_path / out), "--vocab-size", "400")
        assert proc.returncode == 0, proc.stderr
    a = AutoTokenizer.from_pretrained(tmp_path / "a")  # plain transformers loads it
    b = load_tokenizer(str(tmp_path / "b"))
    assert a.eos_token == "<|endoftext|>" and a.eos_token_id == 0
    assert len(a) == 400
    assert fingerprint(a) == fingerprint(b)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    text = "def forward(self, x):\n    return x"
    assert a.decode(a(text)["input_ids"]) == text  # byte-level: lossless


def test_fingerprint_differs_between_tokenizers(tmp_path, tokenizer_dir):
    files = [str(f) for f in code_files(80_000)]
    run_cli("tokenizer", "train", *files, "-o", str(tmp_path / "c"), "--vocab-size", "300")
    assert fingerprint(load_tokenizer(str(tmp_path / "c"))) != fingerprint(load_tokenizer(str(tokenizer_dir)))
