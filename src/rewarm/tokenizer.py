"""Tokenizers: train a byte-level BPE, load any HF fast tokenizer, fingerprint it.

The fingerprint is a hash of what decides token ids (vocab, merges, added tokens,
normalizer, pre-tokenizer), so token shards can refuse a model whose tokenizer
would read them differently.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from rewarm import atomic
from rewarm.errors import UserError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


def check_output_dir(out: Path) -> None:
    """A tokenizer replaces only a tokenizer: never a file, nor a directory holding anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file, not a directory. Choose a directory for the tokenizer.")
    if out.is_dir() and any(out.iterdir()) and not (out / "tokenizer.json").is_file():
        raise UserError(f"-o {out} is a directory that holds other files (no tokenizer.json): rewarm will not "
                        f"replace it. Choose a new or empty directory.")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on `texts` and save a PreTrainedTokenizerFast directory.

    Deterministic for the same texts in the same order (single-threaded merge counting
    ties are broken by the library deterministically). The EOS token `<|endoftext|>` is id 0.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not 256 < vocab_size <= 1 << 24:
        raise UserError(f"--vocab-size must be in [257, 16,777,216] (256 bytes + end-of-text at least), got {vocab_size}.")
    check_output_dir(Path(out_dir))  # before the training, not after
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"n": 0}

    from rewarm.data.sources import texts as as_texts

    def counted() -> Iterator[str]:
        for t in as_texts(texts):
            seen["n"] += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen["n"] == 0:
        raise UserError("no text found to train the tokenizer on. Check the input paths.")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=None)
    out = Path(out_dir)
    tmp = atomic.temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    return atomic.commit(tmp, out)


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load an HF fast tokenizer from a directory or hub id; it must have an EOS token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load a tokenizer from `{name_or_path}`: {str(exc).splitlines()[0]}. "
            f"Pass a directory made by `rewarm tokenizer train`, a model dir with tokenizer files, or a hub id."
        ) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer `{name_or_path}` is not a fast (Rust) tokenizer; rewarm needs one.")
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer `{name_or_path}` has no EOS token; documents are separated by EOS.")
    return tok


def fingerprint(tok) -> str:
    """sha256 (first 16 hex) of the parts of tokenizer.json that decide token ids."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
