"""`rewarm retrofit BASE -o DIR`: a pretrained decoder → its RETRO model (`rewarm.retro.modeling`),
every base weight copied, the new modules initialised so that the outputs equal the base's.

The check is made, not assumed: the retro-fitted model and the base score the same random
sequence (with random neighbours fed to the CCA layers); the largest logit gap is recorded in
`retrofit.json` inside the model directory (written before the directory is renamed into place).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rewarm.errors import UserError


def retrofit(base_dir: str, out: str | Path, *, db: str | None = None, chunk: int | None = None, k: int = 2,
             cca_layers: list[int] | None = None, encoder_layers: int = 2, seed: int = 0,
             overwrite: bool = False) -> dict:
    from rewarm import atomic
    from rewarm.model import load_pretrained, save_model
    from rewarm.retro.database import RetrievalDB
    from rewarm.retro.modeling import RetroConfig, RetroForCausalLM, RetroLayer, default_cca_layers
    from rewarm.tokenizer import fingerprint, load_tokenizer
    from rewarm.wrapping import base_config_dict

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists. Choose another -o, or pass --overwrite.")
    if out.exists() and Path(base_dir).exists() and out.resolve() == Path(base_dir).resolve():
        raise UserError(f"-o {out} is the base model itself: write the RETRO model somewhere else.")
    if out.exists() and not (out / "retrofit.json").is_file():
        raise UserError(f"--overwrite would delete {out}, which is not a RETRO model `rewarm retrofit` wrote. "
                        f"Choose another -o.")
    if cca_layers is not None and not cca_layers:
        raise UserError("--cca-layers names no layer: give 1-indexed layer numbers, e.g. 6,9,12.")
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}.")
    atomic.remove_stale_temps(out.parent, f".{out.name}.tmp-*")
    base = load_pretrained(base_dir)
    if getattr(base.config, "model_type", None) not in ("gpt_neox", "llama"):
        raise UserError(f"`rewarm retrofit` adds RETRO layers to GPT-NeoX and Llama-family decoders; {base_dir} is "
                        f"`{base.config.model_type}`.")
    tokenizer = load_tokenizer(base_dir)
    database = None
    if db:
        database = RetrievalDB(db)
        database.check_tokenizer(fingerprint(tokenizer), f"the base model {base_dir}")
        if chunk is not None and chunk != database.chunk:
            raise UserError(f"--chunk {chunk} but the database {db} has chunks of {database.chunk}. Drop --chunk.")
        chunk = database.chunk
        if k > database.n:
            raise UserError(f"--k {k} is more than the database's {database.n} chunks.")
    chunk = 64 if chunk is None else int(chunk)
    n_layers = base.config.num_hidden_layers
    layers = cca_layers if cca_layers else default_cca_layers(n_layers)
    if any(not 1 <= x <= n_layers for x in layers) or len(set(layers)) != len(layers):
        raise UserError(f"--cca-layers must be distinct layers 1..{n_layers} (1-indexed), got {layers}.")
    max_pos = getattr(base.config, "max_position_embeddings", None)
    if max_pos is not None and 2 * chunk > max_pos:
        raise UserError(f"chunks of {chunk} need sequences of at least {2 * chunk} tokens; the base model has "
                        f"{max_pos} positions. Use a smaller --chunk.")
    try:
        config = RetroConfig(base=base_config_dict(base.config), chunk=chunk, retrieval_k=k, cca_layers=sorted(layers),
                             encoder_layers=encoder_layers,
                             retrieval_db=str(Path(db).resolve()) if db else None,
                             retrieval_db_id=database.identity if database else None,
                             retrieval_tokenizer=database.fingerprint if database else None)
    except ValueError as exc:
        raise UserError(f"cannot build the RETRO model: {exc}.") from None
    torch.manual_seed(seed)
    model = RetroForCausalLM(config)
    body = getattr(base, base.base_model_prefix)
    inner = model.backbone.inner
    wrapped = {n - 1 for n in config.cca_layers}
    sd = {}
    for key, value in body.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and int(parts[1]) in wrapped:
            key = ".".join([*parts[:2], "block", *parts[2:]])
        sd[key] = value
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    if unexpected or any(".cca." not in key for key in missing):
        raise UserError(f"the base's weights do not fit the RETRO model (unexpected {unexpected[:3]}, missing "
                        f"{[m for m in missing if '.cca.' not in m][:3]}).")
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(base.get_output_embeddings().state_dict())
    assert sum(isinstance(m, RetroLayer) for m in inner.layers) == len(config.cca_layers)
    gap = step0_gap(base, model)
    if gap > 1e-4:
        raise RuntimeError(f"the retro-fitted model differs from its base at step 0 by {gap:.2e} (a bug)")
    record = {"base": str(base_dir), "chunk": chunk, "cca_layers": config.cca_layers, "encoder_layers": encoder_layers,
              "retrieval_db": config.retrieval_db, "step0_max_logit_gap": gap,
              "params_base": sum(p.numel() for p in base.parameters()),
              "params_retro": sum(p.numel() for p in model.backbone.encoder.parameters())
              + sum(p.numel() for m in model.backbone.retrieval_modules()[1:] for p in m.parameters())}
    save_model(model, out, tokenizer, extra_files={"retrofit.json": json.dumps(record, indent=1)})
    return {"out": str(out), **record}


@torch.no_grad()
def step0_gap(base: torch.nn.Module, retro: torch.nn.Module, seed: int = 0) -> float:
    """Largest |logit difference| between base and retro-fitted on a random sequence of two chunks,
    with random neighbours fed to every CCA layer (so the check covers the CCA path, not a skip)."""
    g = torch.Generator().manual_seed(seed)
    m, k = retro.config.chunk, retro.config.retrieval_k
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (1, 2 * m), generator=g)
    neighbours = torch.randint(0, vocab, (1, 2, k, 2 * m), generator=g)
    base.eval(), retro.eval()
    a = base(input_ids=ids).logits
    b = retro(input_ids=ids, neighbours=neighbours).logits
    return float((a - b).abs().max())
