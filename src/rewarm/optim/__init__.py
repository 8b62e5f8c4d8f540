"""Optimizers beyond AdamW, registered under `optimizer.name` (rewarm.optimizers) on `import rewarm`."""


def register() -> None:
    from rewarm import optimizers
    from rewarm.optim import onebit_adam

    optimizers.register("onebit_adam", onebit_adam.build, onebit_adam.check)
