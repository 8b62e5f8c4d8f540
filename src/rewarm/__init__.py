"""rewarm: continual pre-training of language models, with the price of forgetting in view."""

__version__ = "0.1.0"
