"""TFDS builders of evaluation sets that the TFDS catalog lacks (each in a folder of its own,
as `tfds build PATH/TO/FOLDER` loads them; they import nothing from crate_jax)."""
