"""`rewarm linearize`: turn a pretrained Transformer into a linear-time model by continued training
(LoLCATs, Hedgehog, Liger), on rewarm.mixers' model and rewarm's ordinary training runs."""
