"""gs:// against a real storage server on this machine (tests/gcs_server.py: gcp-storage-emulator on
127.0.0.1), through the same clients a TPU run uses: gcsfs under etils.epath (config.json,
metrics.jsonl, shards, the tokenizer, the compilation cache), google-cloud-storage under
tensorboardX (TensorBoard events) and tensorstore under orbax (checkpoints).

Each component round-trips through the server, and what the clients wrote is read back from the
server itself (its JSON API), not through the client under test. The headline test keeps a whole
training run in the bucket, SIGKILLs it after its first checkpoint, resumes it with the same
command and compares it bitwise with the same command on a local folder; its data comes from
two worker processes per run (crate_jax.data.wds.processes), which read the bucket themselves.
"""

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import gcs_server
import jax
import numpy as np
import pytest
from etils import epath
from multiprocess_utils import FAST_COMPILE, child_pids
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


@pytest.fixture(scope="module")
def gcs():
    with gcs_server.running() as server, server.environment():
        yield server


def _gs(server, name: str) -> str:
    return f"gs://{server.bucket}/{name}"


def test_epath_round_trip(gcs, tmp_path):
    path = epath.Path(_gs(gcs, "epath/dir/a.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"x": 1}')
    (path.parent / "b.bin").write_bytes(bytes(range(256)))
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json", "b.bin"]
    assert gcs.objects("epath/") == {"epath/dir/a.json": 8, "epath/dir/b.bin": 256}
    assert gcs.read("epath/dir/b.bin") == bytes(range(256))
    assert not epath.Path(_gs(gcs, "epath/missing")).exists()
    assert not os.path.exists("gs:")  # nothing went to a local folder named like the URL


def test_reconstruction_figure_on_gs_is_replaced_by_the_next_evaluation(gcs):
    """The MAE evaluator writes WORKDIR/reconstruction.png at every evaluation; on gs:// the
    second figure replaces the first (a rename onto an existing object is refused)."""
    from types import SimpleNamespace

    from crate_jax.evals.reconstruction import ReconstructionEvaluator

    evaluator = ReconstructionEvaluator("reconstruction", list, lambda b: b, None,
                                        mask_ratio=0.5, figure_images=2)
    evaluator.output_dir = _gs(gcs, "mae_run")
    cfg = SimpleNamespace(grid=(2, 2), patch_size=4)
    sizes = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        out = {"pixels": rng.normal(size=(2, 4, 48)), "pred": rng.normal(size=(2, 4, 48)),
               "mask": rng.random((2, 4)) < 0.5}
        path = evaluator.write_figure(out, cfg, np.ones(2))
        png = epath.Path(path).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        sizes.append(len(png))
    assert set(gcs.objects("mae_run/")) == {"mae_run/reconstruction.png"}
    assert gcs.objects("mae_run/")["mae_run/reconstruction.png"] == sizes[-1]


def test_tokenizer_from_gs(gcs):
    from crate_jax.data import tokenizer as tokenizers

    local = os.path.join(ROOT, "crate_jax", "data", "assets", "shapes_captions.model")
    remote = _gs(gcs, "tokenizers/shapes_captions.model")
    epath.Path(remote).write_bytes(open(local, "rb").read())
    want, got = tokenizers.load(local), tokenizers.load(remote)
    text = ["a large red circle left of a small blue star", "a green square"]
    np.testing.assert_array_equal(tokenizers.tokenize(got, text, 16),
                                  tokenizers.tokenize(want, text, 16))
    with pytest.raises(FileNotFoundError, match=r"missing\.model"):
        tokenizers.load(_gs(gcs, "tokenizers/missing.model"))


def _caption_samples(n: int):
    from crate_jax.data.synthetic import ShapesCaptions

    source = ShapesCaptions("train", num_examples=n, image_size=32)
    for i in range(n):
        example = source[i]
        buffer = io.BytesIO()
        Image.fromarray(example["image"]).save(buffer, format="JPEG", quality=90)
        yield {"key": f"{i:06d}", "image": buffer.getvalue(), "caption": example["caption"]}


def _write_shards(directory: str, n: int = 96, per_shard: int = 24) -> list[str]:
    from crate_jax.data.webdataset import write_shards

    return write_shards(directory, _caption_samples(n), per_shard)


def test_webdataset_shards_on_gs_read_and_resume(gcs, tmp_path):
    from crate_jax.data.webdataset import WebDatasetReader

    remote = _write_shards(_gs(gcs, "wds"), n=40, per_shard=10)
    local = _write_shards(str(tmp_path), n=40, per_shard=10)
    assert len(remote) == 4 and all(p.startswith("gs://") for p in remote)
    for r, l_ in zip(remote, local, strict=True):  # byte-identical objects in the bucket
        assert gcs.read(r.split("/", 3)[3]) == open(l_, "rb").read()

    def read(shards, n, state=None):
        reader = WebDatasetReader(shards, seed=3, process_index=0, process_count=1,
                                  shuffle_buffer=4)
        if state is not None:
            reader.set_state(state)
        out = [(s["key"], s["caption"], s["image"]) for s in (next(reader) for _ in range(n))]
        return out, reader.get_state()

    want, _ = read(local, 60)  # more than one epoch
    got, _ = read(remote, 60)
    assert got == want
    _, state = read(remote, 17)  # resume in the middle of a shard: a seek in the gs:// object
    rest, _ = read(remote, 43, state)
    assert rest == want[17:]


def _events(data: bytes) -> list:
    """TFRecord framing (length, masked crc32c, payload, masked crc32c) → Event protos."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(b: bytes) -> int:
        crc = crc32c(b)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[pos + 8:pos + 12])[0] == masked(header)
        payload = data[pos + 12:pos + 12 + length]
        assert struct.unpack("I", data[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
        events.append(Event.FromString(payload))
        pos += 16 + length
    return events


def test_metric_writer_on_gs_appends_across_restarts(gcs):
    from crate_jax.train.metrics import MetricWriter

    workdir = _gs(gcs, "metrics_run")
    writer = MetricWriter(workdir)
    writer.write(2, {"train/loss": 1.5, "note": "x"})
    writer.write(4, {"train/loss": 1.25})
    writer.close()
    again = MetricWriter(workdir)  # a resumed run: earlier rows stay (gs:// cannot append)
    again.write(6, {"train/loss": 1.0})
    again.close()
    rows = [json.loads(line) for line in gcs.read("metrics_run/metrics.jsonl").splitlines()]
    assert rows == [{"step": 2, "train/loss": 1.5, "note": "x"}, {"step": 4, "train/loss": 1.25},
                    {"step": 6, "train/loss": 1.0}]
    files = [n for n in gcs.objects("metrics_run/tensorboard/") if "tfevents" in n]
    assert len(files) == 2  # one event file per writer
    scalars = sorted((e.step, v.tag, v.simple_value) for name in files
                     for e in _events(gcs.read(name)) for v in e.summary.value)
    assert scalars == [(2, "train/loss", 1.5), (4, "train/loss", 1.25), (6, "train/loss", 1.0)]


def test_the_workdir_lock_on_gs(gcs):
    """Issue 37 F on GCS: created only if absent and replaced only under a precondition on
    its generation (the emulator checks them: tests/gcs_server.py)."""
    from test_cluster_faults import exercise_lock

    exercise_lock(_gs(gcs, "locked_run"))
    assert not any(name.startswith("locked_run/") for name in gcs.objects())


def test_tensorboard_without_google_cloud_storage_names_it(gcs, monkeypatch, caplog):
    from tensorboardX import record_writer

    from crate_jax.train.metrics import MetricWriter

    # What an environment without google-cloud-storage sees (tensorboardX checks at import).
    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    writer = MetricWriter(_gs(gcs, "no_tb_run"))
    writer.write(1, {"train/loss": 2.0})
    writer.close()
    assert "google-cloud-storage" in caplog.text
    assert "tensorboardX is not installed" not in caplog.text
    assert list(gcs.objects("no_tb_run/")) == ["no_tb_run/metrics.jsonl"]


def test_analyze_names_what_it_cannot_do_with_a_run_in_gs(gcs, tmp_path, capsys):
    """A language-model run in a bucket: one line saying the neuron analysis reads local
    workdirs (exit 2, nothing written); a bucket --out is refused by the flags."""
    from crate_jax import analyze

    workdir = _gs(gcs, "lm_run")
    epath.Path(workdir, "config.json").write_text(json.dumps({"trainer": "mlm"}))
    assert analyze.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
    assert "reads a local workdir only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        analyze.parse_args([f"--workdir={workdir}", f"--out={_gs(gcs, 'figures')}"])


def test_orbax_checkpoint_on_gs_sharded(gcs):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from crate_jax.train.checkpoint import Checkpointer

    class Position:
        def __init__(self, pos):
            self.pos = pos

        def get_state(self):
            return {"pos": self.pos}

        def set_state(self, state):
            self.pos = state["pos"]

    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = NamedSharding(mesh, P("fsdp"))
    w = np.arange(64, dtype=np.float32).reshape(16, 4) / 7
    state = {"step": jax.numpy.int32(3), "params": {"w": jax.device_put(w, sharded)}}
    directory = _gs(gcs, "orbax_run/checkpoints")
    checkpointer = Checkpointer(directory, async_save=True)
    checkpointer.save(3, state, Position(11))
    checkpointer.close()
    names = gcs.objects("orbax_run/checkpoints/3/")
    assert "orbax_run/checkpoints/3/data/process_0-of-1.json" in names
    assert any(n.startswith("orbax_run/checkpoints/3/state/") for n in names)

    again = Checkpointer(directory, async_save=False)
    assert again.latest_step() == 3
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded)
                          if x.ndim else jax.ShapeDtypeStruct((), x.dtype), state)
    target["step"] = jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))
    position = Position(0)
    restored = again.restore(3, target, position)
    again.close()
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), w)
    assert restored["params"]["w"].sharding == sharded
    assert int(restored["step"]) == 3 and position.pos == 11


# --- a whole run in the bucket, SIGKILLed and resumed, against the same run in a local folder ---

STEPS, EVERY = 8, 4
RUN_CONFIG = '''"""The demo smoke config on webdataset shards and a SentencePiece model."""
import importlib.util


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("demo", {demo!r})
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config("smoke")
    c.data.update(source="webdataset", shards={shards!r}, tokenizer={tokenizer!r},
                  shuffle_buffer=8, num_workers=2, worker_processes=2)
    c.total_steps = c.optim.total_steps = {steps}
    c.checkpoint.update(every={every}, async_save=False)
    c.log_every = 2
    return c
'''


def _train(config: str, workdir: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crate_jax.main", f"--config={config}",
                             f"--workdir={workdir}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows_by_step(text: str) -> dict[int, dict]:
    """metrics.jsonl → {step: merged row} (the last row of a step wins: a resumed run logs
    again the steps after its checkpoint). Dropped: timings, and data/samples, the count of
    samples the reader's prefetch threads have read so far, which depends on thread timing
    (it differs between two runs in the same folder too)."""
    out: dict[int, dict] = {}
    for line in text.splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if not k.startswith("perf/") and k != "data/samples"})
    return out


def _data_workers(pid: int) -> list[int]:
    """The data worker processes (crate_jax.data.wds.processes) started by process `pid`."""
    return sorted(c for c in child_pids(pid)
                  if _alive(c) and b"crate_jax.data.wds.processes" in _cmdline(c))


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):  # it ended after it was listed
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
        return False


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, out[-4000:]
    return out


def test_run_on_gs_killed_and_resumed_equals_local_run(gcs, tmp_path):
    from crate_jax.train.loop import final_params

    shards = _write_shards(_gs(gcs, "run_data/shards"))
    tokenizer = _gs(gcs, "run_data/shapes_captions.model")
    local_tok = os.path.join(ROOT, "crate_jax", "data", "assets", "shapes_captions.model")
    epath.Path(tokenizer).write_bytes(open(local_tok, "rb").read())
    config = tmp_path / "gs_demo.py"
    config.write_text(RUN_CONFIG.format(demo=os.path.join(ROOT, "configs", "demo.py"),
                                        shards=shards, tokenizer=tokenizer, steps=STEPS,
                                        every=EVERY))
    env = {**os.environ, **gcs.env(), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE}
    gs_env = {**env, "JAX_COMPILATION_CACHE_DIR": _gs(gcs, "xla_cache")}
    workdir = _gs(gcs, "run")

    # The local-folder run goes alongside the first gs:// run (two cores, two processes).
    local = _train(str(config), str(tmp_path / "local_run"), env)
    first = _train(str(config), workdir, gs_env)
    committed = re.compile(r"run/checkpoints/(\d+)/commit_success\.txt$")
    deadline = time.monotonic() + TIMEOUT
    while not any(committed.match(n) for n in gcs.objects("run/checkpoints/")):
        assert first.poll() is None, first.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint in the bucket in time"
        time.sleep(0.05)
    workers = _data_workers(first.pid)
    assert len(workers) == 2, workers
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):  # they notice their parent is gone
        assert time.monotonic() < deadline, "data workers outlived the killed run"
        time.sleep(0.1)
    saved = sorted(int(committed.match(n)[1]) for n in gcs.objects("run/checkpoints/")
                   if committed.match(n))
    assert saved[-1] < STEPS, "the run finished before it was killed"

    out = _finish(_train(str(config), workdir, gs_env))
    assert f"resumed from step {saved[-1]} in {workdir}" in out, out[-4000:]
    _finish(local)

    names = gcs.objects("run/")
    assert "run/config.json" in names and "run/metrics.jsonl" in names
    assert any("tfevents" in n for n in names if n.startswith("run/tensorboard/"))
    assert gcs.objects("xla_cache/"), "no compilation cache entries in the bucket"
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
    gs_rows = _rows_by_step(gcs.read("run/metrics.jsonl").decode())
    local_rows = _rows_by_step((tmp_path / "local_run" / "metrics.jsonl").read_text())
    differing = {(step, k): (row.get(k), local_rows.get(step, {}).get(k))
                 for step, row in gs_rows.items() for k in row
                 if row.get(k) != local_rows.get(step, {}).get(k)}
    assert not differing and gs_rows.keys() == local_rows.keys(), differing
    assert STEPS in gs_rows and "train/loss" in gs_rows[STEPS]
    assert any(k.startswith("zeroshot/") for k in gs_rows[STEPS])
    got, want = final_params(workdir), final_params(str(tmp_path / "local_run"))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(want)) > 10
    _analyze_reads_the_run_in_the_bucket(workdir, got, tmp_path)


def _analyze_reads_the_run_in_the_bucket(workdir: str, params: dict, tmp_path) -> None:
    """crate_jax.analyze loads the run from gs:// (its workdir, and one step directory: the
    image tower holds the checkpoint's values), and asks for a local --out."""
    from flax import nnx

    from crate_jax import analyze
    from crate_jax.convert.runs import read_checkpoint

    for run in (analyze.load_workdir(workdir),
                analyze.load_checkpoint(f"{workdir}/checkpoints/{STEPS}")):
        assert run.step == STEPS
        loaded = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
        jax.tree.map(np.testing.assert_array_equal, loaded, params["image"])
    read, _, step = read_checkpoint(f"{workdir}/checkpoints", missing="none")
    assert step == STEPS
    jax.tree.map(np.testing.assert_array_equal, read, params)
    with pytest.raises(SystemExit):
        analyze.parse_args([f"--workdir={workdir}"])  # no --out: the figures are local
    assert not (tmp_path / "gs:").exists()
