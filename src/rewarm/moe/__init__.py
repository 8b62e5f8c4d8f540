"""Upcycling a dense model into a mixture of experts (BAM, BTX) and the routing losses that train it.

- `modeling`: the MoE model class (registered with transformers' Auto classes on `import rewarm`);
- `routing`: top-k FFN experts, load balancing (micro- or global-batch), router z-loss;
- `attention`: BAM's soft-routed mixture of attention experts (and its KV-sharing variant);
- `families`: where GPT-NeoX and Llama keep attention and FFN;
- `mix`: branches → one MoE (and the identical-branches check);
- `balance`: the global-batch expert load, before each step's micro-batches;
- `upcycle`: `rewarm upcycle`: branch runs → mix → MoE run → routing per domain;
- `specialisation`: which experts each domain's tokens go to.
"""


def register() -> None:
    from rewarm.moe.balance import register as register_balance
    from rewarm.moe.modeling import register as register_model

    register_model()
    register_balance()
