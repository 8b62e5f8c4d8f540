"""rewarm: continual pre-training of language models, with the price of forgetting in view."""

__version__ = "0.1.0"


def _register_model_classes() -> None:
    """Model classes of the subpackages become known to transformers' Auto classes, so saved models
    load with AutoModelForCausalLM after `import rewarm` (no remote code). See DESIGN: the seams."""
    try:
        from rewarm.mixers.modeling import register
    except ImportError:  # without torch/transformers there is nothing to register
        return
    register()


_register_model_classes()
