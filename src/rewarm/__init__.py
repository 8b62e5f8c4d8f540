"""rewarm: continual pre-training of language models, with the price of forgetting in view."""

__version__ = "0.1.0"


def _register_subpackages() -> None:
    """Subpackages plug in: their model classes become known to transformers' Auto classes (saved
    models load with AutoModelForCausalLM after `import rewarm`, no remote code), their optimizers
    to `optimizer.name`, their eval hooks to `eval.<name>`, their loss terms to the loop. See
    DESIGN: the seams."""
    try:
        from rewarm.analysis.health import register as register_eval_hooks
        from rewarm.mixers.modeling import register
        from rewarm.moe import register as register_moe
        from rewarm.optim import register as register_optimizers
        from rewarm.replay.kl import register as register_loss_terms
        from rewarm.retro import register as register_retro
    except ImportError:  # without torch/transformers there is nothing to register
        return
    register()
    register_optimizers()
    register_eval_hooks()
    register_loss_terms()
    register_moe()
    register_retro()


_register_subpackages()
