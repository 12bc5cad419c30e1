"""Helpers for the config files in configs/: argument parsing, engine defaults, smoke mode."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'smoke,variant=L/14,stage=finetune' → ConfigDict(smoke=True, variant='L/14', ...).

    Every key must be one of `defaults`; values take the type of their default."""
    out = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"config argument {key!r} unknown; arguments are {sorted(defaults)}")
        default = defaults[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def model_field_placeholders() -> dict[str, Any]:
    """A typed None placeholder for every field of VisionConfig (so that a command-line
    override parses to the field's type)."""
    from crate_jax.models.config import VisionConfig

    out = {}
    for field in dataclasses.fields(VisionConfig):
        type_name = str(field.type).split("|")[0].strip()
        out[field.name] = config_dict.placeholder(_TYPES.get(type_name, str))
    return out


def model_overrides(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.model's field settings: `overrides`, then every field set on its own."""
    fields = {k: v for k, v in model.items() if k not in ("name", "overrides") and v is not None}
    return {**dict(model.get("overrides") or {}), **fields}


def base_config() -> ml_collections.ConfigDict:
    """Engine defaults every config starts from (configs override what they need)."""
    c = ml_collections.ConfigDict()
    c.trainer = "classification"
    c.seed = 0
    c.batch_size = 256
    c.total_steps = 1000
    c.grad_accum_steps = 1
    c.grad_accum_mode = "auto"  # contrastive: feature-cached (the whole batch's update)
    c.log_every = 50
    c.eval_every = 0  # 0: only at the end
    c.eval_batch_size = 256
    c.mesh = ml_collections.ConfigDict({"dcn": 1, "data": 1, "fsdp": -1, "tensor": 1})
    c.sharding_rules = None  # None: crate_jax.parallel.DEFAULT_RULES
    c.measure_flops = True
    c.tensorboard = True
    # typed placeholders (None until set) so that --config.KEY=VALUE can set them
    c.wandb_project = config_dict.placeholder(str)
    # resuming with changed settings: the dotted keys that may differ from the saved config,
    # comma-separated (--config.resume_overrides=optim.lr,optim.eps); see train/loop.py
    c.resume_overrides = config_dict.placeholder(str)
    c.profile = ml_collections.ConfigDict({"start_step": -1, "num_steps": 0})
    c.init_from = config_dict.placeholder(str)  # a workdir or checkpoint to finetune from
    c.init_step = config_dict.placeholder(int)
    c.init_prefix = config_dict.placeholder(str)  # only the parameters below this path (MAE)
    c.reinit_head = True
    # classification: Mixup / CutMix Beta alphas (0 = off), overridable from the command line
    c.mixup = 0.0
    c.cutmix = 0.0
    c.mix_switch_prob = 0.5

    # Every model field can be set on the command line (--config.model.pool=gap); None
    # keeps the registry's value, and `overrides` (a dict) is the configs' way to set several.
    c.model = ml_collections.ConfigDict({"name": "crate-alpha-b/16", "overrides": {},
                                         **model_field_placeholders()})

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, mu_dtype=None,
        clip_norm=1.0, schedule="cosine", warmup_steps=100, total_steps=1000, end_lr=0.0,
        warmup_init_lr=0.0, layer_decay=None))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=500, keep=2, keep_best=1, best_metric="val/top1", best_mode="max",
        async_save=True))
    return c


def _smoke_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Four steps of 16 examples, checkpoints every 2, nothing loaded from other runs."""
    c.batch_size = 16
    c.eval_batch_size = 16
    c.grad_accum_steps = 1
    c.total_steps = 4
    c.optim.total_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 2
    c.checkpoint.every = 2
    c.measure_flops = False
    c.init_from = None
    if "init_towers" in c:
        c.init_towers = None
    return c


def smoke(c: ml_collections.ConfigDict, *, model_name: str | None = None,
          image_size: int = 16, patch: int = 8) -> ml_collections.ConfigDict:
    """Shrink a config to seconds on a CPU: a toy model of the same family, synthetic data,
    a few steps; the code path (task, loss, optimizer, sharding, checkpoints) stays real."""
    name = model_name or c.model.name
    family = name.rsplit("-", 1)[0]
    c.model.name = f"{family}-ti/{patch}" if "crate-alpha" in family or family == "vit" else \
        f"{family}-t/{patch}"
    c.model.overrides = ml_collections.ConfigDict(
        {**dict(c.model.get("overrides", {})), "width": 32, "depth": 2, "heads": 2})
    if "data" in c:
        c.data.source = "synthetic_shapes"
        c.data.image_size = image_size
        c.data.num_classes = 4
        c.data.num_train_examples = 256
        c.data.num_eval_examples = 40
        c.data.train_split, c.data.eval_split = "train", "test"
        c.data.train_augment = "flip"
        c.data.num_workers = 0
    return _smoke_schedule(c)


def smoke_clip(c: ml_collections.ConfigDict, *,
               probe: bool = False) -> ml_collections.ConfigDict:
    """Smoke mode for contrastive configs: toy towers of the same families, synthetic captions.
    A CLIPA text tower keeps the CLIPA path: the BERT WordPiece vocabulary (the shipped
    vocab.txt of the synthetic captions), 32 tokens, reduced as the stage reduces them."""
    image_family = c.model.image.rsplit("-", 1)[0]
    c.model.image = (f"{image_family}-t/8" if image_family == "crate" else
                     f"{image_family}-ti/8")
    c.model.image_overrides = ml_collections.ConfigDict(
        {**dict(c.model.get("image_overrides", {})), "width": 32, "depth": 2, "heads": 2})
    text_family = c.model.text.rsplit("-", 1)[0]
    clipa_text = text_family == "clipa-text"
    c.model.text = f"{text_family}-b" if clipa_text else f"{text_family}-ti"
    c.model.text_overrides = ml_collections.ConfigDict(
        {**dict(c.model.get("text_overrides", {})), "width": 32, "depth": 1, "heads": 2})
    c.model.embed_dim = 16
    context = 32 if clipa_text else 72
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_captions", image_size=16, holdout_pairs=4, seed=0,
        num_train_examples=256,
        tokenizer="builtin:shapes_captions_bert" if clipa_text else "bytes",
        context_length=context, text_tokens=min(c.data.get("text_tokens") or context, context),
        text_reduction=c.data.get("text_reduction", "truncate"), num_workers=0))
    c.evals = ml_collections.ConfigDict(dict(
        zeroshot=dict(kind="zeroshot", source="synthetic_captions", split="test",
                      holdout_pairs=4, heldout_only=True, num_examples=24),
        retrieval=dict(kind="retrieval", source="synthetic_captions", split="test",
                       num_examples=24)))
    if probe:
        c.evals.probe = dict(kind="probe", source="synthetic_captions", split="test",
                             holdout_pairs=0, train_split="train", num_examples=48,
                             num_classes=64)
    c.checkpoint.best_metric = "zeroshot/top1"
    return _smoke_schedule(c)


# The CRATE-α-CLIPA recipe trains the image tower against a pretrained text tower that stays
# frozen together with the temperature (docs/design.md §4; the official config freezes 't' and
# 'txt/.*').
CLIPA_FROZEN = ("text", "text_proj", "logit_scale")


def clipa_config(*, image: str, text: str, embed_dim: int, arg: str | None,
                 pretrain: dict, finetune: dict) -> ml_collections.ConfigDict:
    """A CRATE-α-CLIPA recipe (docs/design.md §4) with a low-resolution pretrain stage and a
    full-resolution finetune stage: `--config=configs/clipa_X.py:stage=pretrain|finetune
    [,text_from=RUN][,init_from=RUN][,shards=PATTERN][,tokenizer=vocab.txt][,smoke]`.

    text_from: the run whose text tower, text projection and temperature are loaded and frozen
    (an imported release: `python -m crate_jax.convert import --from crate-alpha-clipa-torch
    crate_alpha_CLIPA_L14.pth RUN`). pretrain / finetune: image_size, text_tokens, batch_size,
    lr, warmup_steps, samples."""
    args = parse_arg(arg, stage="pretrain", init_from="", text_from="", shards="",
                     tokenizer="", smoke=False)
    if args.stage not in ("pretrain", "finetune"):
        raise ValueError(f"config argument stage={args.stage!r}: 'pretrain' or 'finetune'")
    stage = ml_collections.ConfigDict(pretrain if args.stage == "pretrain" else finetune)
    c = base_config()
    c.trainer = "contrastive"
    c.loss = "infonce"
    # vocab_size, pad and end-of-text ids come from the tokenizer (clipa-text's table has the
    # release's 32,000 rows); the image tower pools the cls token, its stem has no bias
    c.model = ml_collections.ConfigDict(dict(
        image=image, image_overrides=dict(pool="cls", stem_bias=False, dtype="bfloat16",
                                          remat="dots"),
        text=text, text_overrides=dict(dtype="bfloat16"), embed_dim=embed_dim))
    c.data = _clipa_data(args, stage)
    c.image_reduction = ml_collections.ConfigDict(dict(strategy="none", keep=1.0))
    c.evals = _clipa_evals()
    c.batch_size = stage.batch_size
    c.eval_batch_size = 1024
    c.total_steps = int(stage.samples) // stage.batch_size
    c.optim.update(name="adamw", lr=stage.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.2,
                   mu_dtype="bfloat16", clip_norm=1.0, schedule="cosine",
                   warmup_steps=stage.warmup_steps, total_steps=c.total_steps, end_lr=0.0)
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint.update(every=1000, keep=2, keep_best=1, best_metric="imagenet_zeroshot/top1")
    c.mesh = ml_collections.ConfigDict({"dcn": 1, "data": 1, "fsdp": -1, "tensor": 1})
    c.freeze = list(CLIPA_FROZEN)
    c.init_towers = ([dict(keys=list(CLIPA_FROZEN), **{"from": args.text_from})]
                     if args.text_from else None)
    if args.stage == "finetune":
        c.init_from = args.init_from or None  # the pretrain run: position embedding resized
        c.reinit_head = False
    if args.smoke:
        smoke_clip(c)
    return c


def _clipa_data(args: ml_collections.ConfigDict,
                stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """clipa_config's data settings: webdataset shards, the stage's image size and text tokens."""
    return ml_collections.ConfigDict(dict(
        source="webdataset", shards=args.shards or config_dict.placeholder(str),
        paths=config_dict.placeholder(str),  # for data.source='array_record'
        tokenizer=args.tokenizer or config_dict.placeholder(str),
        image_size=stage.image_size, context_length=32, text_tokens=stage.text_tokens,
        text_reduction="truncate", crop_area=(0.4, 1.0), flip=False, shuffle_buffer=250_000,
        # ~9 GiB of encoded DataComp samples (~35 KB each); the byte bound guards a host
        # against shards of larger images. 8 worker processes (each 1/8 of the buffer, 8
        # shards open, 4 decode threads): threads alone stall on the GIL (README, Input
        # pipelines)
        shuffle_buffer_bytes=12 << 30, interleave=8, max_bad_fraction=0.2,
        worker_processes=8, num_workers=4,
        # evaluation images as the release's eval_in1k.py makes them: short side bilinear,
        # centre crop of the whole short side
        eval_crop_fraction=1.0, eval_interpolation="bilinear"))


def _clipa_evals() -> ml_collections.ConfigDict:
    """clipa_config's evaluations, the release's protocols (docs/design.md §3): ImageNet-1K
    zero-shot with the 80 templates, retrieval on COCO's Karpathy 5k test and Flickr30k's 1k
    test, 5 captions per image."""
    return ml_collections.ConfigDict(dict(
        imagenet_zeroshot=dict(kind="zeroshot", source="tfds", name="imagenet2012",
                               split="validation", optional=True),
        coco_retrieval=dict(kind="retrieval", source="tfds", name="coco_captions",
                            split="test", captions_per_image=5, optional=True),
        flickr30k_retrieval=dict(kind="retrieval", source="tfds", name="flickr30k",
                                 split="test", captions_per_image=5, optional=True)))


def mae_model_fields(c: ml_collections.ConfigDict) -> None:
    """A masked autoencoder's decoder settings as typed model fields, so that the command
    line can set them (--config.model.decoder_depth=4)."""
    for key, kind in (("decoder_width", int), ("decoder_depth", int), ("decoder_heads", int),
                      ("mask_in_encoder", bool)):
        c.model[key] = config_dict.placeholder(kind)


def smoke_mae(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Smoke mode for masked-autoencoder configs: a toy model of the same family (and
    decoder kind), 16 px synthetic shapes, small evaluation splits, a few steps."""
    family = c.model.name.split("-mae-")[0]
    smoke(c, model_name=c.model.name, image_size=16, patch=4)
    c.model.name = f"{family}-mae-{'ti' if family == 'vit' else 't'}/4"
    c.model.overrides = ml_collections.ConfigDict(dict(width=32, depth=2, heads=2))
    if family == "vit":
        c.model.overrides.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
    _smoke_probe_evals(c)
    return c


def smoke_simdino(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Smoke mode for SimDINO configs: a toy backbone of the same family, 16 px global and
    8 px local views, a small head, small evaluation splits, a few steps."""
    smoke(c, image_size=16, patch=4)
    c.model.overrides.pool = "gap"
    c.head = ml_collections.ConfigDict(dict(hidden=32, dim=16))
    c.data.local_crops, c.data.local_size = 2, 8
    _smoke_probe_evals(c)
    return c


def _smoke_probe_evals(c: ml_collections.ConfigDict) -> None:
    for spec in c.evals.values():
        spec.num_examples, spec.num_classes = 32, 4
        spec.split = "test"
        if "train_split" in spec:
            spec.train_split, spec.num_train_examples = "train", 64
    c.eval_batch_size = 16
