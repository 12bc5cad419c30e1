"""A real Google Cloud Storage server for the tests: the `gcp-storage-emulator` package (its JSON
and upload APIs over HTTP) in a subprocess on 127.0.0.1, in memory, and the environment that
points each storage client of ours at it with no credentials.

    with running() as server, server.environment():
        epath.Path(f"gs://{server.bucket}/x").write_text("...")

Clients and the settings they read (see `GcsServer.env`):
- google-cloud-storage (TensorBoard's gs:// writer in tensorboardX) and gcsfs (etils.epath's
  gs:// backend without tensorflow): STORAGE_EMULATOR_HOST.
- gcsfs: FSSPEC_GCS_TOKEN=anon (fsspec passes FSSPEC_<PROTOCOL>_<ARG> to the filesystem) so it
  does not probe for credentials, and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs ≥ 2025.x
  otherwise asks the gRPC storage-control API for each bucket's layout, which the emulator does
  not serve (every call then waits 60 s before gcsfs falls back to the JSON API it uses anyway).
- tensorstore (orbax's array writes): TENSORSTORE_GCS_HTTP_URL, TENSORSTORE_GCS_HTTP_VERSION=1
  (the emulator speaks HTTP/1) and GOOGLE_AUTH_TOKEN_FOR_TESTING (a fixed bearer token instead
  of looking for application-default credentials).

One gap of the emulator is filled (`_serve`): its media downloads lack the x-goog-generation
header that GCS sends with every object read. tensorstore needs it (without it each read of a
checkpoint in a fresh process fails with "Malformed StorageGeneration"), so the server adds it,
with x-goog-metageneration, from the object's own metadata. A second gap: it ignores
ifGenerationMatch, the precondition GCS checks on uploads and deletes (create-only-if-absent
with 0, compare-and-swap otherwise; the workdir lock of crate_jax/train/lock.py relies on it),
so the server checks it before its upload and delete handlers run (`_with_preconditions`).
Nothing else is changed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """A running emulator: its URL, one bucket, and a few JSON-API helpers for assertions."""

    def __init__(self, process: subprocess.Popen, port: int, bucket: str):
        self.process, self.port, self.bucket = process, port, bucket
        self.url = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        """The environment variables that send every client to this server (module docstring)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "FSSPEC_GCS_TOKEN": "anon",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "TENSORSTORE_GCS_HTTP_URL": self.url, "TENSORSTORE_GCS_HTTP_VERSION": "1",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test",
                "NO_GCE_CHECK": "True"}

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Set `env()` in this process (for in-process clients) and restore it afterwards."""
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def objects(self, prefix: str = "") -> dict[str, int]:
        """{object name: size} of the bucket's objects under `prefix`, asked of the server itself
        (not through the clients under test)."""
        out: dict[str, int] = {}
        token = ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}",
                                        timeout=30) as r:
                page = json.load(r)
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken", "")
            if not token:
                return out

    def read(self, name: str) -> bytes:
        """The content of object `name`, downloaded with a plain HTTP GET."""
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(
                f"{self.url}/download/storage/v1/b/{self.bucket}/o/{quoted}?alt=media",
                timeout=30) as r:
            return r.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_ready(process: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as r:
                if r.read() == b"OK":
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    return False


def start(bucket: str = "crate-test", timeout: float = 30.0) -> GcsServer:
    """Start the emulator in memory on a free port of 127.0.0.1 with `bucket` created."""
    for _ in range(3):  # the free port may be taken between the probe and the server's bind
        port = _free_port()
        log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                                   stdout=log, stderr=subprocess.STDOUT)
        server = GcsServer(process, port, bucket)
        if _wait_ready(process, server.url, timeout):
            return server
        server.stop()
        log.seek(0)
        error = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"gcp-storage-emulator did not start on 127.0.0.1: {error}")


@contextlib.contextmanager
def running(bucket: str = "crate-test") -> Iterator[GcsServer]:
    """A server for the duration of the block, stopped (and its data gone) afterwards."""
    server = start(bucket)
    try:
        yield server
    finally:
        server.stop()


def _with_generation_headers(handler):
    """`handler` (an emulator object GET), plus the generation headers GCS sends with reads."""
    from http import HTTPStatus

    def wrapped(request, response, storage, *args, **kwargs):
        handler(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"],
                                           request.params["object_id"])
            except Exception:  # e.g. a soft-deleted object's metadata: nothing to add
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return wrapped


def _with_preconditions(handler):
    """`handler` (an emulator upload or object DELETE), refused with 412 Precondition Failed
    when the request's ifGenerationMatch is not the object's generation (0: absent)."""
    from http import HTTPStatus

    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted:
            name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or {}).get("name")
            try:
                current = int(storage.get_file_obj(request.params["bucket_name"],
                                                   name)["generation"])
            except Exception:  # no such object
                current = 0
            if current != int(wanted[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return None
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _serve(port: int, bucket: str) -> None:
    """Run the emulator in memory on 127.0.0.1:`port` with `bucket` (see the module docstring
    for the header and the precondition check it gains)."""
    import logging

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    logging.getLogger().setLevel(logging.CRITICAL)  # the emulator's --quiet

    for _, methods in server.HANDLERS:
        if methods.get("GET") in (objects.get, objects.download):
            methods["GET"] = _with_generation_headers(methods["GET"])
        if methods.get("POST") is objects.insert:
            methods["POST"] = _with_preconditions(methods["POST"])
        if methods.get("DELETE") is objects.delete:
            methods["DELETE"] = _with_preconditions(methods["DELETE"])
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
