"""Metric sinks: a progress line on stdout, JSON lines and TensorBoard events in the workdir,
and Weights & Biases when it is installed and asked for. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from typing import Any

import jax
from etils import epath

from crate_jax import perf
from crate_jax.train.workdir import atomic_write_text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _rate(tflops: float) -> str:
    """A FLOP rate per device: TFLOP/s, or GFLOP/s below 1 TFLOP/s (a CPU, a tiny model)."""
    return f"{tflops:.2f} TFLOP/s/dev" if tflops >= 1 else f"{1e3 * tflops:.3g} GFLOP/s/dev"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def is_remote(path: str | epath.Path) -> bool:
    """Whether `path` is in an object store (gs://, s3://, ...), where files cannot be appended
    to: a write replaces the whole object."""
    return "://" in str(path)


class _JsonLines:
    """WORKDIR/metrics.jsonl, one JSON object per line, kept across restarts.

    A local file is opened for appending. An object-store file cannot be appended to (gcsfs
    silently truncates on mode 'a'), so there the lines read at the start plus every new one
    are kept in memory and the whole object is uploaded again after each write: an upload
    replaces the object atomically, so a run killed at any point leaves the previous complete
    file, never a truncated one. Metric rows are few (one per log or eval step), so the cost
    stays small."""

    def __init__(self, path: epath.Path):
        self.path = path
        self._lines: list[str] | None = None
        self._file = None
        if is_remote(path):
            text = path.read_text() if path.exists() else ""
            if text and not text.endswith("\n"):
                text += "\n"  # a partial last line must not swallow the next row
            self._lines = [text] if text else []
        else:
            self._file = path.open("a")

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _close_gcs_events_once() -> None:
    """Make tensorboardX's gs:// event files upload once on close, not again when collected.

    Its GCSRecordWriter uploads the whole file in close() and calls close() again from __del__;
    SummaryWriter keeps it alive in an atexit hook, so that second upload happens at exit, where
    the storage may be unreachable (the client then retries for two minutes)."""
    from tensorboardX import record_writer

    class GCSRecordWriterClosingOnce(record_writer.GCSRecordWriter):
        def close(self):
            if getattr(self, "buffer", None) is not None and not getattr(self, "_closed", False):
                self._closed = True
                self.flush()

    class Factory(record_writer.GCSRecordWriterFactory):
        def open(self, path):
            return GCSRecordWriterClosingOnce(path)

    record_writer.register_writer_factory("gs", Factory())


def _import_summary_writer():
    """tensorboardX's SummaryWriter, imported without torch. tensorboardX imports torch, when
    it is installed, only to accept torch tensors, which this writer never passes; that import
    alone took 1.2 of the 1.5 s that `import tensorboardX` took on the 2-core development
    machine, at every start of a run. A None in sys.modules makes `import torch` raise
    ImportError, which tensorboardX catches; the entry goes right after, so torch imports as
    usual anywhere else. Where torch is imported already, tensorboardX gets it."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


def _tensorboard_writer(logdir: str):
    """A tensorboardX SummaryWriter, or None with a warning that names what is missing."""
    try:
        SummaryWriter = _import_summary_writer()
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")
        return None
    if logdir.startswith("gs://"):
        _close_gcs_events_once()
    try:
        # The default file name has a one-second timestamp: a restart within the same second
        # would replace the earlier file in a bucket, hence a finer suffix.
        return SummaryWriter(logdir, filename_suffix=f".{time.time_ns() % 10**9:09d}")
    except ImportError as e:  # e.g. a gs:// logdir without google-cloud-storage
        logging.warning("no TensorBoard events in %s: %s", logdir, e)
        return None


def wandb_run_id(workdir: epath.Path) -> str:
    """The wandb run id of the run in `workdir` (WORKDIR/wandb_run_id), made and saved on
    the first start, so that every restart logs to the same wandb run."""
    path = workdir / "wandb_run_id"
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]  # wandb ids: letters and digits
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id)
    return run_id


class MetricWriter:
    """writer.write(step, {'train/loss': 0.3, ...}) → metrics.jsonl, TensorBoard, wandb.

    Works with local and gs:// workdirs (TensorBoard on gs:// needs google-cloud-storage)."""

    def __init__(self, workdir: str | epath.Path, *, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self.workdir = epath.Path(workdir)
        self._tb = self._wandb = None
        if not self.enabled:
            return
        self._jsonl = _JsonLines(self.workdir / "metrics.jsonl")
        if tensorboard:
            self._tb = _tensorboard_writer(str(self.workdir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
                # wandb keeps its files in a local folder; a bucket cannot be one.
                local_dir = None if is_remote(self.workdir) else str(self.workdir)
                # One wandb run across restarts: its id is kept in the workdir.
                self._wandb = wandb.init(project=wandb_project, config=config,
                                         dir=local_dir, id=wandb_run_id(self.workdir),
                                         resume="allow")
            except ImportError:
                logging.warning("wandb was asked for but is not installed")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class Throughput:
    """Step time, examples/s, model and hardware TFLOP/s per device, MFU and HFU (on devices
    with a known peak) and ETA between two progress lines. `flops` holds the two counts of
    one step of the global batch (perf.StepFlops; None: not measured); `memory_bytes` XLA's
    planned peak of the compiled step per device (perf.planned_peak_bytes), logged with every
    line as perf/step_memory_mib."""

    def __init__(self, *, batch_size: int, flops: perf.StepFlops | None, total_steps: int,
                 start_step: int, memory_bytes: int | None = None):
        self.batch_size = batch_size
        self.flops = flops
        self.memory_bytes = memory_bytes
        self.total_steps = total_steps
        self.num_devices = jax.device_count()
        self.peak = perf.peak_flops()
        self._t, self._step = time.perf_counter(), start_step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._step, 1)
        step_time = (now - self._t) / steps
        self._t, self._step = now, step
        out = {"perf/step_time_s": step_time,
               "perf/examples_per_s": self.batch_size / step_time,
               "perf/eta_s": step_time * (self.total_steps - step)}
        if self.memory_bytes is not None:
            out["perf/step_memory_mib"] = self.memory_bytes / 2**20
        if self.flops is not None:
            for kind, name in (("model", "mfu"), ("hardware", "hfu")):
                per_device = getattr(self.flops, kind) / step_time / self.num_devices
                out[f"perf/{kind}_tflops_per_device"] = per_device / 1e12
                if self.peak:
                    out[f"perf/{name}"] = per_device / self.peak
        return out


def progress_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """step 120/1000 | loss 2.301 | lr 1.0e-03 | grad_norm 1.2 | 512 img/s | ... | ETA 3m10s"""
    parts = [f"step {step}/{total}"]
    for key, label in (("train/loss", "loss"), ("train/lr", "lr"),
                       ("train/grad_norm", "grad_norm")):
        if key in metrics:
            parts.append(f"{label} {_fmt(float(metrics[key]))}")
    for key, value in metrics.items():
        if key.startswith("train/") and key not in ("train/loss", "train/lr", "train/grad_norm"):
            parts.append(f"{key[6:]} {_fmt(float(value))}")
    if "perf/examples_per_s" in metrics:
        parts.append(f"{metrics['perf/examples_per_s']:.1f} ex/s")
        parts.append(f"step {1e3 * metrics['perf/step_time_s']:.0f} ms")
        for kind in ("model", "hardware"):
            if f"perf/{kind}_tflops_per_device" in metrics:
                parts.append(f"{kind} {_rate(metrics[f'perf/{kind}_tflops_per_device'])}")
        for key, label in (("perf/mfu", "MFU"), ("perf/hfu", "HFU")):
            if key in metrics:
                parts.append(f"{label} {100 * metrics[key]:.1f}%")
        parts.append(f"ETA {_duration(metrics['perf/eta_s'])}")
    return " | ".join(parts)
