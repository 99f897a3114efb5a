"""Downloads interrupted: a generate that is stopped (Ctrl-C) while a model downloads leaves no
partial file under a final name, and the next run finishes the download and generates.

The Hub is a small HTTP server on loopback speaking the part of the Hugging Face API that
`huggingface_hub.snapshot_download` uses (repo info, file tree, HEAD and ranged GET on
`resolve/`), serving a tiny pipeline saved with diffusers; HF_ENDPOINT points the CLI at it.
"""

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures import make_pipeline as mp

SHA = "b0" * 20
REPO = "org/tiny-klein"


class FakeHub:
    """Serves `root`'s files; the file named `stall` stops after its first half until `go`."""

    def __init__(self, root: Path, stall: str):
        self.files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.stall, self.half_sent, self.go = stall, threading.Event(), threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, head: bool):
                name = self.path.split("/resolve/", 1)[1].split("/", 1)[1].split("?")[0]
                data = hub.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.end_headers()
                if head:
                    return
                body = data[start:]
                try:
                    if name == hub.stall and not hub.go.is_set():
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        hub.half_sent.set()
                        hub.go.wait(60)
                        return  # the connection closes with the file half sent
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_HEAD(self):
                if "/resolve/" in self.path:
                    return self._file(True)
                self.send_response(404)
                self.end_headers()

            def do_GET(self):
                if self.path.startswith(f"/api/models/{REPO}/revision/"):
                    return self._json({"id": REPO, "sha": SHA, "siblings": [{"rfilename": f} for f in hub.files]})
                if self.path.startswith(f"/api/models/{REPO}/tree/"):
                    return self._json([{"type": "file", "path": f, "size": len(d),
                                        "oid": hashlib.sha1(d).hexdigest()} for f, d in hub.files.items()])
                if "/resolve/" in self.path:
                    return self._file(False)
                self.send_response(404)
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.go.set()
        self.server.shutdown()


@pytest.fixture
def hub(tmp_path):
    _, src = mp.make_pipeline(tmp_path / "src", text_layers=(9, 18, 27))  # the CLI taps the default layers
    weights = next(p for p in src.rglob("transformer/*.safetensors"))
    h = FakeHub(src, weights.relative_to(src).as_posix())
    yield h
    h.close()


def _generate(hub, tmp_path, out):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    # Ctrl-C as a terminal delivers it: a runner started in the background (a shell job, a CI
    # script under nohup) hands its children SIGINT ignored, and Python keeps it ignored.
    return subprocess.Popen([sys.executable, "-m", "bonsai_mlx", "generate", "a pine", "--model", REPO, "-o", str(out),
                             "--width", "64", "--height", "64", "--seed", "1", "--dtype", "float32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_interrupted_download_leaves_no_partial_file_and_a_rerun_finishes(hub, tmp_path):
    out = tmp_path / "pine.png"
    proc = _generate(hub, tmp_path, out)
    assert hub.half_sent.wait(120), "the download never reached the transformer's weights"
    proc.send_signal(signal.SIGINT)  # Ctrl-C with the weights half downloaded
    _, stderr = proc.communicate(timeout=30)  # at once: no waiting for the download's threads
    assert proc.returncode == 130 and stderr.strip().endswith("cancelled") and not out.exists()
    snapshot = tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    name = hub.stall
    assert not (snapshot / name).exists(), "a half-downloaded file stands under its final name"
    for p in (tmp_path / "cache").rglob("*"):  # every file under a final name is whole
        # (huggingface_hub also leaves an empty `tmp_<uuid>` when the interrupt lands between
        # creating and removing the probe it reads the folder's permissions from: no blob's name)
        if p.is_file() and not p.name.endswith(".incomplete") and not p.name.startswith("tmp_") and "blobs" in p.parts:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name
    hub.go.set()  # the network is back
    proc = _generate(hub, tmp_path, out)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    assert out.exists() and "wrote" in stdout
    assert (snapshot / name).read_bytes() == hub.files[name]
