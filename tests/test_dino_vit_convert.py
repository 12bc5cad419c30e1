"""The released SimDINO / SimDINOv2 ViT backbones (docs/design.md §1), as a user takes them: DINO
and DINOv2 checkpoints made by a PyTorch module of our own (tests/dino_vit_torch_reference.py)
with random weights at a small width are imported with `python -m crate_jax.convert import
--from dino-vit-torch`; our ViT then computes the module's features, and the export loads back
into the module with load_state_dict(strict=True), bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch module needs requirements-torch.txt")

from dino_vit_torch_reference import (  # noqa: E402
    DinoViT,
    dino_checkpoint,
    dinov2_checkpoint,
    randomize,
)
from multiprocess_utils import FAST_COMPILE, ROOT, env  # noqa: E402

from crate_jax import models  # noqa: E402
from crate_jax.convert import (  # noqa: E402
    ConversionError,
    Imported,
    export_weights,
    import_weights,
    load_run,
)
from crate_jax.convert.dino_vit import to_dino_vit_torch  # noqa: E402

# 64 wide with 4 heads (not a standard width: heads must be given), 2 blocks, patch 8 on 32 px
SIZES = dict(image=32, patch=8, width=64, depth=2, heads=4)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "crate_jax.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count=1 "
                                            f"{FAST_COMPILE}"))


def _module(seed: int, **kwargs) -> DinoViT:
    module = DinoViT(**{**SIZES, **kwargs})
    randomize(module, seed)
    return module.eval()


def _images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 32, 32, 3)).astype(np.float32)


def _assert_same_features(model, module: DinoViT) -> None:
    images = _images()
    with torch.no_grad():
        want = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model(images))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _assert_loads_bitwise(state_dict: dict, module: DinoViT, **kwargs) -> None:
    fresh = DinoViT(**{**SIZES, **kwargs})
    fresh.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()},
                          strict=True)
    for key, value in module.state_dict().items():
        if key == "mask_token":  # not imported (training only): written as its zero init
            assert not fresh.state_dict()[key].any()
        else:
            assert torch.equal(fresh.state_dict()[key], value), key


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """(teacher, student, the DINO checkpoint, the run directory the CLI import wrote, its
    stdout)."""
    base = tmp_path_factory.mktemp("dino_vit")
    teacher, student = _module(0), _module(1)
    path = base / "checkpoint.pth"
    torch.save(dino_checkpoint(student, teacher), path)
    run = base / "run"
    proc = _cli("import", "--from", "dino-vit-torch", str(path), str(run), "--heads", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return teacher, student, path, run, proc.stdout


def test_cli_import_names_what_it_strips_and_skips_and_writes_a_backbone_run(v1):
    teacher, _, _, run, out = v1
    assert "stripped the prefix '_orig_mod.backbone.' from 30 key(s)" in out
    heads = [f"_orig_mod.head.mlp.{i}.{w}" for i in (0, 2, 4) for w in ("bias", "weight")]
    assert f"skipped 6 projection-head key(s) (the SimDINO head, not part of the backbone): " \
           f"{', '.join(sorted(heads))}" in out
    assert "took the 'teacher' dict" in out and "as vit-b/8" in out
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"] == "classification"  # an image backbone: no head, 0 classes
    assert config["data"] == {"num_classes": 0, "image_size": 32}
    params, cfg, name = load_run(run)
    assert (name, cfg.pool, cfg.eps, cfg.final_eps, cfg.mlp_activation, cfg.num_classes) == \
        ("vit-b/8", "cls", 1e-6, 1e-6, "gelu", 0)
    model = Imported(name, {**config["model"]["overrides"], **config["data"]}, params).build()
    _assert_same_features(model, teacher)


def test_export_of_the_run_loads_strictly_into_the_module_bit_for_bit(v1, tmp_path):
    """What `python -m crate_jax.convert export --to dino-vit-torch RUN OUT.pth` runs."""
    teacher, _, _, run, _ = v1
    out = tmp_path / "backbone.pth"
    params, cfg, name = load_run(run)
    assert export_weights(params, "dino-vit-torch", out, cfg, name=name) == []
    _assert_loads_bitwise(torch.load(out, weights_only=True), teacher)


def test_the_student_branch_is_chosen_by_name(v1):
    _, student, path, _, _ = v1
    imported = import_weights(path, "dino-vit-torch", heads=4, branch="student")
    assert any("'_orig_mod.module.backbone.'" in n for n in imported.notes)
    _assert_same_features(imported.build(), student)


@pytest.mark.parametrize("registers", [0, 2])
def test_simdinov2_layerscale_and_registers(registers, tmp_path):
    teacher = _module(3, layer_scale=True, registers=registers)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(dinov2_checkpoint(teacher, depth_per_chunk=1), path)  # blocks.{i}.{i}.*
    imported = import_weights(path, "dino-vit-torch", heads=4)
    assert imported.config().layer_scale_init is not None
    assert imported.config().registers == registers
    assert any(n.startswith("ignored mask_token") for n in imported.notes)
    assert any("FSDP block chunks" in n for n in imported.notes)
    _assert_same_features(imported.build(), teacher)
    export_weights(imported.params, "dino-vit-torch", tmp_path / "out.pth", imported.config())
    _assert_loads_bitwise(torch.load(tmp_path / "out.pth", weights_only=True), teacher,
                          layer_scale=True, registers=registers)


def test_missing_unexpected_and_misplaced_keys_are_refused_by_name():
    state = {k: v for k, v in _module(4).state_dict().items()}
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.q_norm.weight"] = torch.ones(64)
    with pytest.raises(ConversionError, match=r"missing keys \(1\): blocks\.1\.mlp\.fc2\.bias"
                       r"(.|\n)*unexpected keys \(1\): blocks\.0\.attn\.q_norm\.weight"):
        import_weights(state, "dino-vit-torch", heads=4)
    with pytest.raises(ConversionError, match=r"branch='student'.*no 'student' / 'teacher'"):
        import_weights(_module(4).state_dict(), "dino-vit-torch", heads=4, branch="student")
    with pytest.raises(ConversionError, match="width 64 is not a standard ViT width"):
        import_weights(_module(4).state_dict(), "dino-vit-torch")
    with pytest.raises(ConversionError, match="'vit-b/16' says patch 16, but the model has "
                                              "patch 8"):
        import_weights(_module(4).state_dict(), "dino-vit-torch", heads=4, name="vit-b/16")
    with pytest.raises(ValueError, match="registers: register tokens apply to the 'vit'"):
        models.config_for("crate-t/8", registers=2)
    crate = models.config_for("crate-t/8", image_size=32, num_classes=0)
    with pytest.raises(ConversionError, match="a crate model cannot be exported as"):
        export_weights({}, "dino-vit-torch", "unused.pth", crate)


def test_a_simdino_runs_teacher_backbone_exports_to_the_module():
    from flax import nnx

    from crate_jax.config_check import load_config
    from crate_jax.tasks.simdino import SimDINOTask

    config = load_config(os.path.join(ROOT, "configs", "demo_simdino.py") + ":smoke")
    config.model.name = "vit-ti/8"
    config.model.overrides.update(pool="cls")
    config.data.image_size = 32
    model = SimDINOTask(config).build_model(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    notes = []
    state_dict = to_dino_vit_torch(params, model.cfg, notes)
    assert notes == ["a SimDINO run: exported the teacher's backbone (not its projection head)"]
    module = DinoViT(image=32, patch=8, width=32, depth=2, heads=2, hidden=768)
    module.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    _assert_same_features(model.teacher.backbone, module.eval())
