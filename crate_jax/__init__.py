"""crate_jax: white-box transformers (CRATE, CRATE-α) in JAX/Flax NNX."""

__version__ = "0.1.0"


def load(run_dir: str, *, step: int | None = None, tokenizer: str | None = None):
    """A run directory's model, ready for inference, with its preprocessing
    (`crate_jax.inference.load`): `crate_jax.load(run).zero_shot(images, class_names)`."""
    from crate_jax.inference import load as _load

    return _load(run_dir, step=step, tokenizer=tokenizer)
