"""Continued pre-training with retrieval (RETRO-fitting; Borgeaud et al. 2022, Wang et al. 2023).

- `database`: `rewarm retrieval build`: a training split cut into chunks, each stored with its
  continuation, keyed by frozen embeddings (faiss, flat or IVF-PQ) or BM25, with document ids;
- `embed`: the frozen key model (a decoder rewarm loads, mean-pooled at a middle layer);
- `retriever`: chunk tokens → k neighbours, same-document exclusion, a cache, timings;
- `modeling`: the RETRO model class (a pretrained decoder + neighbour encoder + chunked
  cross-attention), registered with transformers' Auto classes on `import rewarm`;
- `retrofit`: `rewarm retrofit`: a base model → its RETRO model, equal to it at step 0;
- `hooks`: what retrieval buys, measured at each eval (loss with / without, repetition).
"""


def register() -> None:
    from rewarm.retro.hooks import register as register_hooks
    from rewarm.retro.modeling import register as register_model

    register_model()
    register_hooks()
