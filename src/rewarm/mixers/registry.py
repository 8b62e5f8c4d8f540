"""Mixer names → block classes, and the per-layer pattern a model config names.

`mixer` in a model config is one of:
- a name (`hedgehog`, `linear`, `gla`, `liger`, `lolcats`, `deltanet`, `norm_attention`, `diag_attention`,
  `mom`, `softmax`) used in every layer;
- `transnormer`: `diag_attention` in the lower half of the layers, `norm_attention` above (the paper);
- `NAME/softmax@N`: NAME everywhere except every N-th layer (N, 2N, ... counted from 1), which keeps
  softmax attention: the usual hybrid ("every 4th layer softmax" is `deltanet/softmax@4`);
- a list with one name per layer.
"""
from __future__ import annotations

import re

from rewarm.mixers.deltanet import DeltaNet
from rewarm.mixers.liger import GatedLinearAttention, LigerAttention
from rewarm.mixers.linear_attention import LinearAttention
from rewarm.mixers.lolcats import LolcatsAttention
from rewarm.mixers.mom import MixtureOfMemories
from rewarm.mixers.softmax import SoftmaxAttention
from rewarm.mixers.transnormer import DiagAttention, NormAttention


class _Katharopoulos(LinearAttention):
    default_feature_map = "elu+1"


MIXERS = {
    "softmax": SoftmaxAttention,
    "hedgehog": LinearAttention,
    "linear": _Katharopoulos,
    "gla": GatedLinearAttention,
    "liger": LigerAttention,
    "lolcats": LolcatsAttention,
    "deltanet": DeltaNet,
    "norm_attention": NormAttention,
    "diag_attention": DiagAttention,
    "mom": MixtureOfMemories,
}
_HYBRID = re.compile(r"^\s*([\w+]+)\s*/\s*(\w+)\s*@\s*(-?\d+)\s*$")


def layer_mixers(spec, num_layers: int) -> list[str]:
    """One mixer name per layer from a name, a pattern or a list (see the module doc)."""
    from difflib import get_close_matches

    def check(name: str) -> str:
        if name == "transnormer":
            raise ValueError("`transnormer` is a whole-model pattern (diag_attention below, norm_attention above), "
                             "not one layer's mixer: in patterns and lists use diag_attention or norm_attention")
        if name not in MIXERS:
            near = get_close_matches(str(name), [*MIXERS, "transnormer"], n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            raise ValueError(f"unknown mixer `{name}`{hint}; choose from {', '.join([*MIXERS, 'transnormer'])}, "
                             "a pattern like `deltanet/softmax@4`, or a list with one name per layer")
        return name

    if isinstance(spec, (list, tuple)):
        if len(spec) != num_layers:
            raise ValueError(f"the mixer list names {len(spec)} layers but the model has {num_layers}")
        return [check(s) for s in spec]
    if not isinstance(spec, str):
        raise ValueError(f"mixer must be a name, a pattern or a list of names, not {spec!r}")
    if spec.strip() == "transnormer":
        lower = num_layers // 2
        return ["diag_attention"] * lower + ["norm_attention"] * (num_layers - lower)
    hybrid = _HYBRID.match(spec)
    if hybrid:
        base, other, every = check(hybrid[1]), check(hybrid[2]), int(hybrid[3])
        if not 1 <= every <= num_layers:
            raise ValueError(f"`{spec}`: the layer interval must be between 1 and the number of layers ({num_layers})")
        return [other if (i + 1) % every == 0 else base for i in range(num_layers)]
    return [check(spec.strip())] * num_layers
