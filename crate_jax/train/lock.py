"""One trainer per workdir: WORKDIR/lock, on a local disk, a shared filesystem or gs://.

The lock is a small JSON object {host, pid, started, token} created only if absent: O_EXCL on a
filesystem (atomic on local disks and on NFSv3+), a generation precondition
(if_generation_match=0) on GCS. While the run lives, a heartbeat thread rewrites it every
`refresh_s` seconds; its age (the file's mtime, the object's update time, against this host's
clock: cluster clocks agree to far better than `stale_s`) tells whether the holder lives. A
lock older than `stale_s`, or one held by a process of this host that no longer exists, is
stale: a requeued job takes it over (renamed aside on a filesystem; replaced under a
precondition on the stale generation on GCS, so of two jobs racing for it one wins). A live
lock refuses the second trainer, naming the holder, before it writes anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from crate_jax.train.workdir import RunFailed

REFRESH_S = 60.0
STALE_S = 300.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class _LocalLock:
    """The lock file on a filesystem."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[dict | None, float | None, Any]:
        """(content, age in seconds, version) or (None, None, None) when absent."""
        try:
            with open(self.path) as f:
                text = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None, None, None
        try:
            content = json.loads(text)
        except json.JSONDecodeError:  # cut while being created: an unknown holder
            content = {}
        return content, age, content.get("token")

    # Each method that writes returns the lock's new version (here: our token), or None
    # when the lock was not as expected.
    def create(self, content: dict) -> Any:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(content))
        return content["token"]

    def replace(self, content: dict, version: Any) -> Any:
        """Rewrite the lock (a new mtime) if it is still the one with token `version`."""
        if self.read()[2] != version:
            return None
        temporary = f"{self.path}.{content['token']}"
        with open(temporary, "w") as f:
            f.write(json.dumps(content))
        os.replace(temporary, self.path)
        return content["token"]

    def take_over(self, content: dict, version: Any) -> Any:
        """Move the stale lock (token `version`) aside, then create ours."""
        aside = f"{self.path}.stale-{content['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self.create(content)
        with open(aside) as f:
            text = f.read()
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(text).get("token") != version:  # another job's fresh lock: put it
                os.rename(aside, self.path)  # back and lose the race
                return None
        os.unlink(aside)
        return self.create(content)

    def delete(self, version: Any) -> None:
        if self.read()[2] == version:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _GcsLock:
    """The lock object in a bucket, with generation preconditions (google-cloud-storage)."""

    def __init__(self, url: str):
        from google.cloud import storage

        bucket, _, self.name = url.removeprefix("gs://").partition("/")
        self.bucket = storage.Client().bucket(bucket)

    def read(self) -> tuple[dict | None, float | None, Any]:
        blob = self.bucket.get_blob(self.name)
        if blob is None:
            return None, None, None
        try:
            content = json.loads(blob.download_as_text(if_generation_match=blob.generation))
        except Exception:  # replaced meanwhile, or cut: an unknown holder, fresh
            content = {}
        age = time.time() - blob.updated.timestamp() if blob.updated else 0.0
        return content, age, blob.generation

    def _upload(self, content: dict, generation: int) -> Any:
        """The new generation, or None when the object's generation is not `generation`."""
        from google.api_core import exceptions

        blob = self.bucket.blob(self.name)
        try:
            blob.upload_from_string(json.dumps(content), if_generation_match=generation)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation

    def create(self, content: dict) -> Any:
        return self._upload(content, 0)

    def replace(self, content: dict, version: Any) -> Any:
        return self._upload(content, version)

    take_over = replace

    def delete(self, version: Any) -> None:
        from google.api_core import exceptions

        with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            self.bucket.blob(self.name).delete(if_generation_match=version)


class WorkdirLock:
    """WORKDIR/lock for the life of a run: `check()` before anything is written, `acquire()`
    when the run starts writing, `release()` at its end (module docstring)."""

    def __init__(self, workdir: str, *, refresh_s: float = REFRESH_S, stale_s: float = STALE_S):
        workdir = str(workdir).rstrip("/")
        self.path = f"{workdir}/lock"
        self._store = _GcsLock(self.path) if workdir.startswith("gs://") else _LocalLock(
            self.path)
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self.content = {"host": socket.gethostname(), "pid": os.getpid(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "token": uuid.uuid4().hex}
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, holder: dict, age: float) -> bool:
        if age > self.stale_s:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])

    def _refuse(self, holder: dict, age: float) -> RunFailed:
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
               f"{holder.get('started', '?')}")
        return RunFailed(
            f"another trainer holds {self.path} ({who}; refreshed {age:.0f}s ago): one "
            f"trainer per workdir. Stop it, or wait; a lock not refreshed for {self.stale_s:.0f}s "
            "(or whose process on this host is gone) is taken over.")

    def check(self) -> None:
        """Raise RunFailed naming the holder when a live trainer holds the lock."""
        holder, age, _ = self._store.read()
        if holder is not None and not self._stale(holder, age):
            raise self._refuse(holder, age)

    def acquire(self) -> None:
        """Take the lock (a stale one is taken over) and start the heartbeat; RunFailed
        naming the holder when a live one holds it."""
        for _ in range(3):
            self._version = self._store.create(self.content)
            if self._version is not None:
                break
            holder, age, version = self._store.read()
            if holder is None:
                continue  # released meanwhile
            if not self._stale(holder, age):
                raise self._refuse(holder, age)
            logging.warning("taking over the stale lock %s (%s)", self.path, holder)
            self._version = self._store.take_over(self.content, version)
            if self._version is not None:
                break
        else:
            raise RunFailed(f"could not take {self.path}: other trainers keep replacing it")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="workdir-lock-heartbeat")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                version = self._store.replace(self.content, self._version)
            except Exception as e:  # a storage hiccup: try again at the next beat
                logging.warning("could not refresh the lock %s: %s", self.path, e)
                continue
            if version is None:
                logging.error("lost the lock %s: another trainer took it over; this run's "
                              "writes now race with it", self.path)
                return
            self._version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._store.delete(self._version)
