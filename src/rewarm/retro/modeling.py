"""The RETRO model: a pretrained decoder (GPT-NeoX or Llama, built by transformers from the base's
config) + a small bidirectional neighbour encoder + chunked cross-attention (CCA) in some layers.
Registered with transformers' Auto classes on `import rewarm` (model_type `rewarm_retro`).

With input H (B, T, d) cut into chunks C_u = H[u·m : (u+1)·m] and k retrieved neighbours
N_u^j (2m tokens each, retrieved with chunk u's tokens):
  encoder:  E_u^j = Enc(Emb(N_u^j) + P; cross-attending to the first CCA layer's input of C_u)
            (2 blocks of bidirectional self-attention, cross-attention, MLP; RETRO §2.3);
  CCA:      for the positions p ∈ [u·m + m − 1, (u+1)·m + m − 1), i.e. chunk u+1 shifted left by
            one so that chunk u's last token already reads them,
            H_p ← H_p + W_o · Attn(Q = W_q·norm(H_p), K, V = W_kv·[E_u^1 … E_u^k])   (RETRO eq. 3)
  so neighbours of chunk u (which depend on chunk u's tokens only) change no output before
  position u·m + m − 1: causal. The first m − 1 positions get no CCA.
W_o starts at zero: at step 0 the model's outputs equal the base model's (tested).

Departures, each for a reason: CCA is applied after the whole decoder block rather than between
its attention and FFN (the block is the base's own module, left untouched); the encoder has
learned absolute positions and CCA none (RETRO uses relative ones); the encoder's width is the
decoder's (no projection needed).

Retrieval happens inside the backbone's forward (so the fused loss path, evaluation, generation
and lm-eval all see it), through a `Retriever` attached at run time or loaded from
`config.retrieval_db`; `model.retrieval(False)` turns it off for a comparison.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rewarm.wrapping import InnerEmbeddings, build_base_config, cache_argument, top_level_kwargs

log = logging.getLogger(__name__)

MODEL_TYPE = "rewarm_retro"


class RetroConfig(PretrainedConfig):
    """The base model's config (`base`) plus the retrieval layers."""

    model_type = MODEL_TYPE

    def __init__(self, base: dict | None = None, chunk: int = 64, retrieval_k: int = 2, cca_layers: list | None = None,
                 encoder_layers: int = 2, retrieval_db: str | None = None, exclude_same_doc: bool = True,
                 retrieval_db_id: str | None = None, retrieval_tokenizer: str | None = None, **kwargs):
        self.base = dict(base or {"model_type": "gpt_neox"})
        self.chunk, self.retrieval_k, self.encoder_layers = int(chunk), int(retrieval_k), int(encoder_layers)
        n = int(self.base.get("num_hidden_layers", 0) or 0)
        self.cca_layers = [int(x) for x in (cca_layers if cca_layers is not None else default_cca_layers(n))]
        self.retrieval_db, self.exclude_same_doc = retrieval_db, bool(exclude_same_doc)
        # which build of the database, and the tokenizer it holds ids of: checked whenever it is opened
        self.retrieval_db_id, self.retrieval_tokenizer = retrieval_db_id, retrieval_tokenizer
        if self.chunk < 2 or self.retrieval_k < 1 or self.encoder_layers < 1:
            raise ValueError(f"chunk must be >= 2, retrieval_k >= 1 and encoder_layers >= 1; got {chunk}, "
                             f"{retrieval_k}, {encoder_layers}")
        if n and (not self.cca_layers or any(not 1 <= x <= n for x in self.cca_layers)):
            raise ValueError(f"cca_layers must be decoder layers 1..{n} (1-indexed), got {self.cca_layers}")
        super().__init__(**top_level_kwargs(self.base, kwargs))

    def base_config(self) -> PretrainedConfig:
        return build_base_config(self.base)


def default_cca_layers(n_layers: int, start: int = 6, every: int = 3) -> list[int]:
    """RETRO's placement: every 3rd layer from the 6th (1-indexed); a shallow model gets its last."""
    layers = list(range(start, n_layers + 1, every))
    return layers or ([n_layers] if n_layers else [])


class _Attention(nn.Module):
    """Multi-head attention without a mask (bidirectional / cross), fused QKV-free for clarity."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, lq, d = x.shape
        q = self.q(x).view(n, lq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(ctx).view(n, ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.o(out.transpose(1, 2).reshape(n, lq, d))


class _EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn, self.cross_attn = _Attention(d, heads), _Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), ctx)
        return x + self.mlp(self.norm3(x))


class NeighbourEncoder(nn.Module):
    """Encodes each neighbour (2m tokens), conditioned on its retrieving chunk's decoder states."""

    def __init__(self, d: int, heads: int, layers: int, neighbour_len: int):
        super().__init__()
        self.pos = nn.Embedding(neighbour_len, d)
        self.blocks = nn.ModuleList(_EncoderBlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, neighbour_emb: torch.Tensor, chunk_states: torch.Tensor) -> torch.Tensor:
        """(B, U, k, r, d) embedded neighbours, (B, U, m, d) chunk states → (B, U, k·r, d)."""
        b, u, k, r, d = neighbour_emb.shape
        x = (neighbour_emb + self.pos.weight[:r].to(neighbour_emb.dtype)).reshape(b * u * k, r, d)
        ctx = chunk_states[:, :, None].expand(b, u, k, *chunk_states.shape[2:]).reshape(b * u * k, -1, d)
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm(x).reshape(b, u, k * r, d)


class ChunkedCrossAttention(nn.Module):
    """RETRO's CCA (see the module docstring); `attn.o` starts at zero."""

    def __init__(self, d: int, heads: int, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.norm = nn.LayerNorm(d)
        self.attn = _Attention(d, heads)

    def forward(self, h: torch.Tensor, encoded: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """h (B, T, d), encoded (B, U, k·r, d) with U = T // m → the update to add to h. `valid` (B, U):
        chunks holding padding retrieved with pad tokens; the positions that read them get nothing."""
        b, t, d = h.shape
        m, u = self.chunk, encoded.shape[1]
        x = self.norm(h[:, m - 1 :])  # position m−1 is chunk 0's last token: the first that may read chunk 0
        span = x.shape[1]
        x = F.pad(x, (0, 0, 0, u * m - span)).reshape(b * u, m, d)
        out = self.attn(x, encoded.reshape(b * u, -1, d)).reshape(b, u * m, d)
        if valid is not None:
            out = out * valid.repeat_interleave(m, dim=1)[:, :, None].to(out.dtype)
        return F.pad(out[:, :span], (0, 0, m - 1, 0))


class _RetroState:
    """What one forward's CCA layers share: neighbours in, encoded neighbours once computed."""

    def __init__(self):
        self.neighbours: torch.Tensor | None = None
        self.encoded: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # (B, U): False for chunks that hold padding
        self.encode = None


class RetroLayer(nn.Module):
    """A base decoder block followed by chunked cross-attention to the current neighbours."""

    def __init__(self, block: nn.Module, cca: ChunkedCrossAttention, state: _RetroState, first: bool):
        super().__init__()
        self.block, self.cca, self.first = block, cca, first
        self._state = [state]  # a list: a plain attribute, not a submodule

    def forward(self, hidden_states, *args, **kwargs):
        state = self._state[0]
        if state.neighbours is not None and self.first:
            state.encoded = state.encode(hidden_states)  # the encoder reads the first CCA layer's input
        out = self.block(hidden_states, *args, **kwargs)
        if state.encoded is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.cca(h, state.encoded, state.valid).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


class RetroBackbone(nn.Module):
    """The base backbone with CCA layers and the encoder; retrieves before running them."""

    def __init__(self, inner: nn.Module, config: RetroConfig):
        super().__init__()
        self.inner, self.config = inner, config
        d, heads = config.base["hidden_size"], config.base["num_attention_heads"]
        self.encoder = NeighbourEncoder(d, heads, config.encoder_layers, 2 * config.chunk)
        self._state = _RetroState()
        self._state.encode = self._encode
        first = min(config.cca_layers)
        for n in config.cca_layers:
            inner.layers[n - 1] = RetroLayer(inner.layers[n - 1], ChunkedCrossAttention(d, heads, config.chunk),
                                             self._state, first=n == first)
        self.retriever = None
        self.mode = "retrieve"  # | "off" (no neighbours, no CCA) | "random" (neighbours drawn at random: the control)
        self._random: torch.Generator | None = None
        self._tried_config_db = False
        self._warned = False
        self._cache_arg = cache_argument(inner)

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    def retrieval_modules(self) -> list[nn.Module]:
        """What RETRO adds (trained when the base is frozen)."""
        return [self.encoder, *(layer.cca for layer in self.inner.layers if isinstance(layer, RetroLayer))]

    def _encode(self, hidden: torch.Tensor) -> torch.Tensor:
        nb = self._state.neighbours
        b, u = nb.shape[:2]
        m = self.config.chunk
        emb = self.inner.get_input_embeddings()(nb).to(hidden.dtype)
        return self.encoder(emb, hidden[:, : u * m].reshape(b, u, m, -1))

    def _retriever(self):
        """The attached retriever, or the one the config names (opened and checked on first use)."""
        if self.retriever is None and not self._tried_config_db and self.config.retrieval_db:
            self._tried_config_db = True
            from rewarm.retro.database import RetrievalDB
            from rewarm.retro.retriever import Retriever

            c = self.config
            if not Path(c.retrieval_db).is_dir():
                from rewarm.errors import UserError

                raise UserError(f"this RETRO model retrieves from {c.retrieval_db}, which does not exist. Restore or "
                                f"rebuild it (`rewarm retrieval build`), or set `retrieval_db` in the model's "
                                f"config.json to another database built from the same tokenizer.")
            self.retriever = Retriever(check_database(RetrievalDB(c.retrieval_db), c), c.retrieval_k, c.exclude_same_doc)
        if self.retriever is None and not self._warned:
            self._warned = True
            log.warning("this RETRO model has no retrieval database: it runs WITHOUT retrieval (its CCA layers idle)")
        return self.retriever

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                cache=None, past_key_values=None, neighbours=None, **kwargs) -> BaseModelOutputWithPast:
        past = cache if cache is not None else past_key_values
        if neighbours is None and self.mode != "off" and input_ids is not None and input_ids.shape[1] >= self.config.chunk:
            retriever = self._retriever()
            if retriever is not None:
                if past is not None and past.get_seq_length() > 0:
                    raise ValueError("a RETRO model with retrieval reads whole sequences: generate with use_cache=False")
                if self.mode == "random":
                    b, t = input_ids.shape
                    neighbours = retriever.random_neighbours((b, t // self.config.chunk), self._random).to(input_ids.device)
                else:
                    neighbours = retriever(input_ids, count=self.training)
        self._state.neighbours = neighbours if neighbours is not None and neighbours.shape[1] > 0 else None
        self._state.encoded = self._state.valid = None
        if self._state.neighbours is not None and attention_mask is not None and attention_mask.dim() == 2 \
                and not bool(attention_mask.all()):  # padded batches (lm-eval): a chunk with padding reads nothing
            b, u = self._state.neighbours.shape[:2]
            m = self.config.chunk
            self._state.valid = attention_mask[:, : u * m].reshape(b, u, m).bool().all(-1)
        kwargs[self._cache_arg] = past
        try:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        finally:
            self._state.neighbours = self._state.encoded = self._state.valid = None
        return out


class RetroForCausalLM(InnerEmbeddings, PreTrainedModel, GenerationMixin):
    config_class = RetroConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True
    _no_split_modules: list = []
    accepts_retrieval = True  # the core's check for `retrieval.db`

    def __init__(self, config: RetroConfig):
        super().__init__(config)
        seed = AutoModelForCausalLM.from_config(config.base_config())
        inner = getattr(seed, seed.base_model_prefix)
        self.backbone = RetroBackbone(inner, config)
        self.lm_head = seed.get_output_embeddings()
        if config.tie_word_embeddings:
            emb = next(n for n, p in inner.named_parameters() if p is inner.get_input_embeddings().weight)
            self._tied_weights_keys = {"lm_head.weight": f"backbone.inner.{emb}"}
        self.post_init()
        with torch.no_grad():  # after every other init: CCA adds nothing at step 0 (the base model's outputs exactly)
            for layer in self.backbone.inner.layers:
                if isinstance(layer, RetroLayer):
                    layer.cca.attn.o.weight.zero_()

    def _init_weights(self, module: nn.Module) -> None:
        """Only RETRO's own modules start here (the base's weights are copied in by `rewarm retrofit`)."""
        if isinstance(module, NeighbourEncoder):
            nn.init.normal_(module.pos.weight, std=0.02)
        if isinstance(module, _Attention):
            for lin in (module.q, module.kv, module.o):
                nn.init.normal_(lin.weight, std=0.02)
        if isinstance(module, _EncoderBlock):
            for lin in (module.mlp[0], module.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- retrieval at run time
    def attach_retriever(self, retriever) -> None:
        check_database(retriever.db, self.config, retriever.k)
        self.backbone.retriever = retriever
        self.config.retrieval_db = str(Path(retriever.db.path).resolve())
        self.config.retrieval_k, self.config.exclude_same_doc = retriever.k, retriever.exclude_same_doc
        self.config.retrieval_db_id, self.config.retrieval_tokenizer = retriever.db.identity, retriever.db.fingerprint

    @property
    def retriever(self):
        return self.backbone._retriever()

    @contextlib.contextmanager
    def retrieval(self, mode: bool | str, seed: int = 0):
        """`with model.retrieval(False):` the same model without neighbours (no CCA at all);
        `retrieval("random")`: neighbours drawn uniformly from the database (seeded), the control that
        separates what relevant text buys from what the CCA layers do with any text."""
        mode = {True: "retrieve", False: "off"}.get(mode, mode)
        if mode not in ("retrieve", "off", "random"):
            raise ValueError(f"retrieval mode must be True, False or 'random', not {mode!r}")
        before = self.backbone.mode
        self.backbone.mode = mode
        self.backbone._random = torch.Generator().manual_seed(seed) if mode == "random" else None
        try:
            yield self
        finally:
            self.backbone.mode = before

    def apply_run_settings(self, cfg) -> None:
        """The run's `retrieval:` and `retrofit:` sections (seam called by the core at start)."""
        from rewarm.retro.settings import apply

        apply(self, cfg)

    def step_metrics(self) -> dict:
        r = self.backbone.retriever
        if r is None:
            return {}
        s = r.take_stats()
        if not s["queries"]:
            return {}
        misses = s["queries"] - s["cache_hits"]
        return {"retrieval_cache_hit": round(s["cache_hits"] / s["queries"], 4),
                **({"retrieval_ms_per_chunk": round(1000 * s["search_seconds"] / misses, 3)} if misses else {})}

    @property
    def needs_full_sequence(self) -> bool:
        """True while retrieving: neighbours are found for whole chunks, so no KV cache."""
        return self.backbone.mode != "off" and self.retriever is not None

    def generate(self, *args, **kwargs):
        if self.needs_full_sequence:
            kwargs["use_cache"] = False  # neighbours are found for whole chunks of the whole sequence
        return super().generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, neighbours=None,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                            past_key_values=past_key_values, neighbours=neighbours, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        extra = {k: v for k, v in out.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **extra)


def check_database(db, config: RetroConfig, k: int | None = None):
    """A database a RETRO model may read: its chunk length, the tokenizer its ids come from, and
    enough chunks for k neighbours (default: the model's k; each refused with what to do)."""
    from rewarm.errors import UserError

    if db.chunk != config.chunk:
        raise UserError(f"the retrieval database {db.path} has chunks of {db.chunk} tokens; this RETRO model reads "
                        f"chunks of {config.chunk}. Build the database with --chunk {config.chunk}.")
    if config.retrieval_tokenizer and db.fingerprint != config.retrieval_tokenizer:
        raise UserError(f"the retrieval database {db.path} holds ids of another tokenizer (fingerprint {db.fingerprint}) "
                        f"than this RETRO model was trained with ({config.retrieval_tokenizer}). Rebuild it from shards "
                        f"prepared with the model's tokenizer.")
    k = config.retrieval_k if k is None else k
    if k > db.n:
        raise UserError(f"k = {k} neighbours asked for; {db.path} holds {db.n} chunks.")
    return db


def register() -> None:
    AutoConfig.register(MODEL_TYPE, RetroConfig, exist_ok=True)
    AutoModelForCausalLM.register(RetroConfig, RetroForCausalLM, exist_ok=True)
