"""Tasks: each supplies a model, data, a loss and evaluators to the one training loop."""

from crate_jax.tasks.base import Evaluator, Task

TASKS = ("classification", "contrastive", "mae", "simdino", "lm", "mlm")


def get(name: str) -> type[Task]:
    """The task class for `config.trainer`."""
    if name == "classification":
        from crate_jax.tasks.classification import ClassificationTask
        return ClassificationTask
    if name == "contrastive":
        from crate_jax.tasks.contrastive import ContrastiveTask
        return ContrastiveTask
    if name == "mae":
        from crate_jax.tasks.mae import MAETask
        return MAETask
    if name == "simdino":
        from crate_jax.tasks.simdino import SimDINOTask
        return SimDINOTask
    if name in ("lm", "mlm"):
        from crate_jax.tasks.language import CausalLMTask, MaskedLMTask
        return CausalLMTask if name == "lm" else MaskedLMTask
    raise ValueError(f"trainer: unknown task {name!r}; known: {', '.join(map(repr, TASKS))}")


__all__ = ["TASKS", "Evaluator", "Task", "get"]
