"""Tasks: each supplies a model, data, a loss and evaluators to the one training loop."""

from crate_jax.tasks.base import Evaluator, Task


def get(name: str) -> type[Task]:
    """The task class for `config.trainer`."""
    if name == "classification":
        from crate_jax.tasks.classification import ClassificationTask
        return ClassificationTask
    if name == "contrastive":
        from crate_jax.tasks.contrastive import ContrastiveTask
        return ContrastiveTask
    raise ValueError(f"trainer: unknown task {name!r}; known: 'classification', 'contrastive'")


__all__ = ["Evaluator", "Task", "get"]
