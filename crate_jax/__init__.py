"""crate_jax: white-box transformers (CRATE, CRATE-α) in JAX/Flax NNX."""

__version__ = "0.1.0"
