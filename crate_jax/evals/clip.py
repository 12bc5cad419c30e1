"""Evaluators for image-text models and frozen image features, gathered under one name:

    embedding.py   sharded embedding of masked batches, tie-aware ranking, protocol records
    zeroshot.py    zero-shot classification (eval_in1k.py's rule; ImageNet's 80 templates)
    retrieval.py   image↔text recall (COCO 5k / Flickr30k 1k as CLIP papers report it)
    probe.py       DINO's weighted k-NN and a linear probe on frozen features
"""

from crate_jax.evals.embedding import (
    TIE_TOLERANCE,
    Batches,
    Embedder,
    describe,
    l2_normalize,
    label_rank,
    preprocessing_protocol,
    replicated_batch_to_global,
    topk_accuracy,
)
from crate_jax.evals.probe import (
    ProbeEvaluator,
    image_features,
    knn_accuracy,
    knn_topk,
    linear_probe_accuracy,
)
from crate_jax.evals.retrieval import RetrievalEvaluator, retrieval_recall
from crate_jax.evals.zeroshot import (
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    ZeroShotEvaluator,
    class_weights,
    imagenet_class_names,
    imagenet_templates,
    read_templates,
)

__all__ = [
    "IMAGENET_TEMPLATES", "SIMPLE_TEMPLATES", "TIE_TOLERANCE", "Batches", "Embedder",
    "ProbeEvaluator", "RetrievalEvaluator", "ZeroShotEvaluator", "class_weights", "describe",
    "image_features", "imagenet_class_names", "imagenet_templates", "knn_accuracy", "knn_topk",
    "l2_normalize", "label_rank", "linear_probe_accuracy", "preprocessing_protocol",
    "read_templates", "replicated_batch_to_global", "retrieval_recall", "topk_accuracy",
]
