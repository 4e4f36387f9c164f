"""A distribution registry (Debian's ``docker-registry``) on loopback, for tests and benchmarks.

:func:`serve` starts one on ``127.0.0.1:<free port>`` with plain HTTP and its storage under the
given directory, waits until it answers, and stops it on the way out. :func:`push` copies an
OCI layout into it with skopeo.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REGISTRY = shutil.which("docker-registry") or shutil.which("registry")


def available() -> bool:
    return REGISTRY is not None and shutil.which("skopeo") is not None


@contextlib.contextmanager
def serve(root: Path) -> Iterator[tuple[str, Path]]:
    """``(host:port, storage directory)`` of a registry running for the block."""
    if REGISTRY is None:
        raise RuntimeError("no docker-registry program (Debian: apt-get install docker-registry)")
    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = root / "config.yml"
    config.write_text(f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: uvmshim-test
""")
    with open(root / "log", "wb") as log:
        proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the registry did not start: "
                                       + (root / "log").read_text()) from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", root / "data"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def push(layout: Path, ref_name: str, dest: str, *, all_images: bool = False,
         compress: bool = False) -> None:
    """Copy image ``ref_name`` of the OCI layout ``layout`` to ``docker://dest`` (plain HTTP)."""
    subprocess.run(["skopeo", "copy", "-q", *(["--all"] if all_images else []),
                    *(["--dest-compress"] if compress else []),
                    "--dest-tls-verify=false", f"oci:{layout}:{ref_name}", f"docker://{dest}"],
                   check=True, capture_output=True)


def blob_path(storage: Path, digest: str) -> Path:
    """Where the registry keeps blob ``digest`` (filesystem storage driver)."""
    hexd = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
