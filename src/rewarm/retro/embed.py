"""Keys for the retrieval database: a frozen decoder rewarm loads (often the base model itself),
run on each chunk alone, hidden states of layer L mean-pooled and L2-normalised.

RETRO keys chunks with frozen BERT embeddings; none is installed here, and the decoder being
retro-fitted already understands its domain. Layers above L are dropped, so keying costs L/N of
a forward. Queries are keyed by the same function, so database and queries always agree."""
from __future__ import annotations

import numpy as np
import torch

from rewarm.errors import UserError


class ChunkEmbedder:
    def __init__(self, model_dir: str, layer: int | None = None, device: str = "cpu"):
        from rewarm.model import load_pretrained

        model = load_pretrained(model_dir)
        body = getattr(model, model.base_model_prefix, None)
        body = getattr(body, "inner", body)  # a RETRO (or MoE) model: key with its own decoder, neighbours off
        layers = getattr(body, "layers", None)
        if layers is None:
            raise UserError(f"{model_dir}: the key model must be a decoder with `layers` (GPT-NeoX, Llama); "
                            f"got {type(model).__name__}. Use --bm25, or another --embed model.")
        n = len(layers)
        self.layer = n // 2 if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise UserError(f"--layer must be between 1 and {n} (the key model's layers), got {layer}.")
        body.layers = layers[: self.layer]  # only what layer L needs
        self.body = body.to(device).eval().float()
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.model_dir = str(model_dir)
        self.device = device

    @torch.no_grad()
    def __call__(self, chunks: np.ndarray | torch.Tensor, batch: int = 64) -> np.ndarray:
        """(n, chunk) token ids → (n, dim) float32 unit vectors. Deterministic on CPU."""
        ids = torch.as_tensor(np.asarray(chunks, dtype=np.int64))
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for i in range(0, len(ids), batch):
            h = self.body(input_ids=ids[i : i + batch].to(self.device), use_cache=False).last_hidden_state
            # the body's last kept layer is L (final norm included): mean over the chunk's tokens
            v = h.float().mean(dim=1)
            out[i : i + batch] = torch.nn.functional.normalize(v, dim=-1).cpu().numpy()
        return out
