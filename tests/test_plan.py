"""The planner (python -m crate_jax.plan), run as its own process as users run it.

Time budget. The real CLIPA-H/14 (configs/clipa_h14.py: 863 M parameters, 32 image + 24 text
layers, batch 65,536) on --mesh=fsdp:64 takes about 210 s to compile on the 2-core development
machine (XLA:CPU; compile time grows faster than linearly with depth: 2 layers per tower 19 s,
4: 22 s, 8: 35 s, 16: 96 s), over this suite's budget. So the default test compiles CLIPA-H/14
with everything real — widths, heads, MLP/ODL sizes, patch size, resolution, text length, the
65,536 batch, the fsdp:64 mesh, the shardings, the optimizer — except 2 layers per tower (a
config written to tmp_path that wraps configs/clipa_h14.py), about 25 s. The full model:
`python -m crate_jax.plan --config=configs/clipa_h14.py --mesh=fsdp:64` (about 4 minutes here).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIPA_H14 = os.path.join(ROOT, "configs", "clipa_h14.py")
DEMO = os.path.join(ROOT, "configs", "demo_classification.py")
GIB = 2**30


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _plan(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crate_jax.plan", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _shallow_clipa_h14(tmp_path, depth=2) -> str:
    path = tmp_path / f"clipa_h14_depth{depth}.py"
    path.write_text(textwrap.dedent(f"""
        import importlib.util

        _spec = importlib.util.spec_from_file_location("clipa_h14", {CLIPA_H14!r})
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)


        def get_config(arg=None):
            c = _module.get_config(arg)
            c.model.image_overrides.depth = {depth}
            c.model.text_overrides.depth = {depth}
            return c
    """))
    return str(path)


def _check_table(out: str):
    for line in ("parameters", "model FLOPs per step", "hardware FLOPs", "compile time",
                 "memory per device",
                 "optimizer state", "activations (temp)", "peak", "device memory", "verdict"):
        assert line in out, out


def _check_result(r: dict, devices: int, usable: int, *, moments: float = 2.0,
                  trainable: float = 1.0):
    """`moments`: optimizer bytes per trainable parameter byte (AdamW in f32: 2; with a bf16
    first moment: 1.5); `trainable`: the fraction of the parameters not frozen."""
    assert r["model_flops_per_device"] > 0 and r["temp_bytes"] > 0
    # remat (the recipes' 'dots', the default 'minimal') only adds to what the step runs
    assert r["hardware_flops_per_device"] > 0.9 * r["model_flops_per_device"]
    assert r["peak_bytes"] == (r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"]
                               - r["alias_bytes"])
    # FSDP over every device: each holds 1/devices of the f32 parameters (a few small leaves
    # that no mesh axis divides stay whole), and AdamW's two moments
    assert 1.0 <= r["param_bytes"] * devices / (4 * r["params"]) < 1.02
    assert r["opt_bytes"] == pytest.approx(moments * trainable * r["param_bytes"], rel=2e-2)
    assert r["fits"] == (r["peak_bytes"] <= usable)


def test_clipa_h14_on_64_devices(tmp_path):
    """CLIPA-H/14 at its real widths and batch on fsdp:64 (2 layers per tower: see the module
    docstring): the memory table, the verdict, and the numbers behind them."""
    config = _shallow_clipa_h14(tmp_path)
    result = tmp_path / "plan.json"
    proc = _plan(f"--config={config}", "--mesh=fsdp:64", "--max-compiles=1",
                 f"--json={result}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    _check_table(out)
    assert "64 fake CPU devices" in out and "1,024 per device" in out
    assert "verdict: FITS as configured" in out or "verdict: DOES NOT FIT" in out
    (report,) = json.loads(result.read_text())
    assert report["mesh"] == {"dcn": 1, "data": 1, "fsdp": 64, "tensor": 1}
    assert report["device_memory_bytes"] == 32 * GIB
    (r,) = report["results"]
    assert r["batch_size"] == 65_536 and r["remat"] == "dots"

    # the parameters are those of the model the trainer builds from the same config
    import importlib.util

    from flax import nnx

    from crate_jax import models, tasks
    spec = importlib.util.spec_from_file_location("shallow", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    model = nnx.eval_shape(lambda: tasks.get(c.trainer)(c).build_model(nnx.Rngs(0)))
    assert r["params"] == models.count_params(model)
    # the recipe's frozen text tower, projection and temperature have no optimizer state;
    # AdamW's first moment is bf16 (2 + 4 bytes per trainable f32 parameter of 4)
    frozen = sum(models.count_params(getattr(model, k)) if k != "logit_scale" else 1
                 for k in c.freeze)
    _check_result(r, 64, report["usable_bytes"], moments=1.5,
                  trainable=1 - frozen / r["params"])



def test_search_finds_the_micro_batch_that_fits(tmp_path):
    """128 images per device of the demo model need about 45 MiB (remat 'minimal'); with 20 MiB
    the search halves the micro-batch (grad_accum_steps 2, about 23 MiB: still too big), fits a
    line through the two peaks and checks its prediction: grad_accum_steps 4."""
    result = tmp_path / "plan.json"
    proc = _plan(f"--config={DEMO}", "--mesh=fsdp:8", "--batch-size=1024",
                 "--device-memory=20MiB", "--max-compiles=3", f"--json={result}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (report,) = json.loads(result.read_text())
    runs = [(r["grad_accum_steps"], r["fits"]) for r in report["results"]]
    assert runs == [(1, False), (2, False), (4, True)], runs
    assert report["suggestion_flags"] == ["--config.grad_accum_steps=4"]
    assert report["predicted"]["largest_micro_batch"] in range(32, 64)
    assert "DOES NOT FIT as configured; fits with: --config.grad_accum_steps=4" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--mesh=fsdpp:64"], "--mesh='fsdpp:64': expected AXIS:SIZE"),
    (["--mesh=fsdp:64", "--accelerator=v4-64"],
     "--mesh='fsdp:64' has 64 devices, but --accelerator=v4-64 gives 32"),
    (["--mesh=fsdp:64", "--devices=32"], "--mesh='fsdp:64' has 64 devices, but --devices=32"),
    (["--mesh=fsdp:64", "--batch-size=100"], "--batch-size=100"),
])
def test_bad_flags_are_named(args, message):
    """As a user meets them: exit status 2 and one line naming the flag (the other flag
    checks are the same functions, tested in-process below)."""
    proc = _plan(f"--config={CLIPA_H14}", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr


def test_units_meshes_and_tpu_types():
    code = textwrap.dedent("""
        from crate_jax.plan import parse_bytes, parse_mesh, tpu_devices, tpu_topology
        assert parse_bytes("32GiB") == 32 * 2**30 and parse_bytes("16GB") == 16 * 10**9
        assert parse_bytes("800MiB") == 800 * 2**20 and parse_bytes("1.5 GiB") == 3 * 2**29
        assert parse_mesh("data:16,fsdp:16") == {"data": 16, "fsdp": 16}
        assert parse_mesh("fsdp=-1,tensor=4") == {"fsdp": -1, "tensor": 4}
        assert parse_mesh("dcn:2,fsdp:32") == {"dcn": 2, "fsdp": 32}
        assert tpu_devices("v4-64") == (32, 32 * 2**30)
        assert tpu_devices("v5litepod-64") == (64, 16 * 2**30)
        assert tpu_devices("v5p-128")[0] == 64 and tpu_devices("v6e-256")[0] == 256
        assert tpu_topology("v4-256") == ("v4:4x4x8", "megacore")
        assert tpu_topology("v5litepod-16") == ("v5e:4x4", "default")
        # the other bad flags, named as the command line names them (exit 2 is tested above)
        from crate_jax.plan import PlanError, resolve_meshes
        meshes, count = resolve_meshes([parse_mesh("dcn:2,fsdp:32")], None, ["dcn:2,fsdp:32"])
        assert count == 64 and list(meshes[0].items()) == [
            ("dcn", 2), ("data", 1), ("fsdp", 32), ("tensor", 1)]
        for call, message in [
                (lambda: parse_mesh("fsdp:x"), "--mesh='fsdp:x'"),
                (lambda: resolve_meshes([parse_mesh("fsdp:-1")], None, ["fsdp:-1"]),
                 "give --devices or --accelerator"),
                (lambda: parse_bytes("32GiBs"), "'32GiBs'"),
                (lambda: tpu_devices("v9-8"), "'v9-8'")]:
            try:
                call()
            except PlanError as e:
                assert message in str(e), (message, str(e))
            else:
                raise AssertionError(f"no error for {message}")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
