"""The metric writer's TensorBoard events, in a fresh process: written, with the scalar in
them, and tensorboardX imported without torch (it imports torch, when installed, only to
accept torch tensors; that import was 1.2 s of every start). torch still imports after."""

import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import importlib.util
import sys

from crate_jax.train.metrics import MetricWriter

writer = MetricWriter(sys.argv[1], tensorboard=True)
writer.write(3, {"train/loss": 0.25})
writer.close()
print("torch imported:", "torch" in sys.modules)
if importlib.util.find_spec("torch") is not None:
    import torch
    print("torch after:", torch.zeros(2).shape[0])
"""


def _records(path) -> list[bytes]:
    """The TFRecord payloads of an events file: length (u64), its CRC, data, data CRC."""
    data, out, at = open(path, "rb").read(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return out


def test_events_are_written_and_torch_is_not_imported(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch imported: False" in proc.stdout
    (events,) = os.listdir(tmp_path / "tensorboard")
    records = _records(tmp_path / "tensorboard" / events)
    scalar = [r for r in records if b"train/loss" in r]
    assert len(scalar) == 1 and struct.pack("<f", 0.25) in scalar[0]
    if "torch after:" in proc.stdout:
        assert "torch after: 2" in proc.stdout
