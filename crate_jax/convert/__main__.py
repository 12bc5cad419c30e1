"""python -m crate_jax.convert import|export ... (see `main` and --help)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

USAGE = """\
python -m crate_jax.convert import --from {crate-torch,crate-alpha-torch,crate-alpha-npz} \\
    IN OUT [--heads K] [--name NAME] [--image-size S] [--patch-size P] \\
    [--allow-extra REGEX=REASON ...] [--set FIELD=VALUE ...]
python -m crate_jax.convert import --from crate-alpha-clipa-torch IN OUT \\
    [--heads K] [--text-heads K] [--allow-extra REGEX=REASON ...]
python -m crate_jax.convert import --from crate-mae-torch IN OUT [--heads K] [--name NAME] \\
    [--image-size S] [--allow-extra REGEX=REASON ...] [--set FIELD=VALUE ...]
python -m crate_jax.convert import --from dino-vit-torch IN OUT [--branch {teacher,student}] \\
    [--heads K] [--name NAME] [--image-size S] [--allow-extra REGEX=REASON ...] \\
    [--set FIELD=VALUE ...]
python -m crate_jax.convert import --from {tost-torch,tost-gpt-torch} IN OUT [--image-size S]
python -m crate_jax.convert export \\
    --to {crate-alpha-torch,crate-torch,crate-alpha-clipa-torch,crate-mae-torch,dino-vit-torch} \\
    RUN_OR_CKPT OUT.{safetensors,pth} [--step N]
python -m crate_jax.convert export --to {tost-torch,tost-gpt-torch} RUN_OR_CKPT OUT [--step N]"""


def _pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    from crate_jax.convert.export import EXPORT_FORMATS
    from crate_jax.convert.importers import FORMATS

    top = argparse.ArgumentParser(
        prog="python -m crate_jax.convert", usage=USAGE,
        description="Import released CRATE / CRATE-α / CRATE-MAE / SimDINO ViT checkpoints as "
                    "a run directory the trainer "
                    "can finetune from (config.init_from=OUT), or export a run's parameters to "
                    "the PyTorch layouts.")
    sub = top.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="checkpoint file -> run directory OUT")
    imp.add_argument("--from", dest="layout", required=True, choices=FORMATS)
    imp.add_argument("input", metavar="IN", help=".pth/.pt/.bin/.ckpt, .npz or .safetensors")
    imp.add_argument("output", metavar="OUT", help="the run directory to create")
    imp.add_argument("--heads", type=int, default=None,
                     help="attention heads (PyTorch layouts do not record them; default: the "
                          "standard size table by width)")
    imp.add_argument("--text-heads", type=int, default=None,
                     help="text-tower heads of a two-tower checkpoint (default: width / 64, "
                          "as the CRATE-α-CLIPA port)")
    imp.add_argument("--branch", choices=("teacher", "student"), default=None,
                     help="dino-vit-torch: the backbone of a DINO checkpoint's 'teacher' "
                          "(default) or 'student' dict")
    imp.add_argument("--name", default=None,
                     help="a registry name hint, e.g. crate-b or crate-alpha-l/14: its size "
                          "gives the heads and the name")
    imp.add_argument("--image-size", type=int, default=None,
                     help="resize the position table (in 2-D) to this image size")
    imp.add_argument("--patch-size", type=int, default=None,
                     help="resize the conv stem kernel to this patch size (CRATE-α)")
    imp.add_argument("--allow-extra", action="append", metavar="REGEX=REASON",
                     help="drop source keys matching REGEX (full match), for REASON")
    imp.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="a model config field that is not in the shapes (pool, eta, lam, "
                          "dtype...); VALUE is parsed as JSON when it can be")
    exp = sub.add_parser("export", help="run or checkpoint directory -> weight file")
    exp.add_argument("--to", dest="layout", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("source", metavar="RUN_OR_CKPT",
                     help="a run directory, its checkpoints/ directory or one step directory")
    exp.add_argument("output", metavar="OUT", help="OUT.safetensors (no torch needed) or OUT.pth")
    exp.add_argument("--step", type=int, default=None, help="the step (default: the latest)")
    return top


def _import_tost(args: argparse.Namespace) -> None:
    """ToST (convert/tost.py): the sizes come from the shapes; only --image-size applies."""
    from crate_jax.convert.tost import import_tost, write_tost_run

    unused = [flag for flag, value in (("--heads", args.heads), ("--name", args.name),
                                       ("--patch-size", args.patch_size), ("--set", args.set),
                                       ("--allow-extra", args.allow_extra),
                                       ("--text-heads", args.text_heads),
                                       ("--branch", args.branch)) if value]
    if unused:
        raise SystemExit(f"{', '.join(unused)}: not used by --from {args.layout} (its sizes "
                         "come from the tensor shapes)")
    imported = import_tost(args.input, args.layout, image_size=args.image_size)
    write_tost_run(args.output, imported, source={"format": args.layout,
                                                  "path": str(args.input)})
    for note in imported.notes:
        print(f"note: {note}")
    print(f"imported {args.input} as {imported.name} {imported.overrides} into {args.output}")


def _import(args: argparse.Namespace) -> None:
    import jax

    from crate_jax.convert.clipa import LAYOUT as CLIPA
    from crate_jax.convert.clipa import ImportedClip
    from crate_jax.convert.crate_mae import ImportedMAE
    from crate_jax.convert.layouts import import_weights
    from crate_jax.convert.runs import write_run

    fields = {k: _json_value(v) for k, v in _pairs(args.set, "--set").items()}
    options = dict(heads=args.heads, name=args.name, image_size=args.image_size,
                   patch_size=args.patch_size, allow_extra=_pairs(args.allow_extra,
                                                                  "--allow-extra"))
    if args.layout == CLIPA:
        options["text_heads"] = args.text_heads
    elif args.text_heads is not None:
        raise SystemExit(f"--text-heads applies to --from {CLIPA} only")
    if args.layout == "dino-vit-torch":
        options["branch"] = args.branch
    elif args.branch is not None:
        raise SystemExit("--branch applies to --from dino-vit-torch only")
    imported = import_weights(args.input, args.layout, **options, **fields)
    write_run(args.output, imported, source={"format": args.layout, "path": str(args.input)})
    count = sum(int(x.size) for x in jax.tree.leaves(imported.params))
    for note in imported.notes:
        print(f"note: {note}")
    if isinstance(imported, ImportedClip):
        clip = imported.clip
        print(f"imported {args.input} as {clip['image']} + {clip['text']} (embedding "
              f"{clip['embed_dim']}, {count:,} parameters, "
              f"{clip['image_overrides']['image_size']} px) into {args.output}")
        print(f"evaluate: python -m crate_jax.evaluate --workdir={args.output} "
              "--tokenizer=vocab.txt --evals=zeroshot,retrieval")
        return
    if isinstance(imported, ImportedMAE):
        enc = imported.config().encoder
        overrides = {k: v for k, v in imported.overrides.items() if k != "image_size"}
        print(f"imported {args.input} as {imported.name} {overrides} ({count:,} parameters, "
              f"{enc.image_size} px) into {args.output}")
        print(f"analyze: python -m crate_jax.analyze --workdir={args.output}")
        print(f"finetune the encoder: --config.init_from={args.output} "
              "--config.init_prefix=backbone")
        return
    overrides = {k: v for k, v in imported.overrides.items()
                 if k not in ("num_classes", "image_size")}
    cfg = imported.config()
    print(f"imported {args.input} as {imported.name} {overrides} ({count:,} parameters, "
          f"{cfg.num_classes} classes, {cfg.image_size} px) into {args.output}")
    print(f"finetune: --config.init_from={args.output} --config.model.name={imported.name} "
          f"(model.overrides {json.dumps(overrides)})")


def _export(args: argparse.Namespace) -> None:
    from crate_jax.convert.layouts import export_weights
    from crate_jax.convert.runs import load_run
    from crate_jax.convert.tost import LAYOUTS as TOST_LAYOUTS
    from crate_jax.convert.tost import export_tost

    if args.layout in TOST_LAYOUTS:  # reads the run's BatchNorm statistics too
        export_tost(args.source, args.layout, args.output, args.step)
        print(f"exported {args.source} as {args.layout} to {args.output}")
        return

    params, cfg, name = load_run(args.source, args.step)
    notes = export_weights(params, args.layout, args.output, cfg, name=name)
    for note in notes:
        print(f"note: {note}")
    print(f"exported {args.source} ({name or 'no config.json'}) as {args.layout} to "
          f"{args.output}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors are printed, status 1)."""
    from crate_jax.convert.importers import ConversionError

    args = parser().parse_args(argv)
    try:
        if args.command == "import" and args.layout in ("tost-torch", "tost-gpt-torch"):
            _import_tost(args)
        else:
            (_import if args.command == "import" else _export)(args)
    except (ConversionError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
