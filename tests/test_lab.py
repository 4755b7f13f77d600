"""`make lab` serves the course on a headless machine, as root or not: tools/lab.sh, started on a loopback port."""
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_lab_serves_the_notebooks_with_the_projects_kernel(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    env = {"VENV": sys.prefix, "HOME": str(tmp_path), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"}
    lab = subprocess.Popen([str(ROOT / "tools" / "lab.sh"), "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, listing = time.monotonic() + 120, None
        while listing is None:
            assert lab.poll() is None, f"jupyter lab exited with {lab.returncode}:\n{lab.stdout.read()}"
            assert time.monotonic() < deadline, "jupyter lab did not answer within 120 s"
            try:
                listing = get_json(f"{base}/api/contents/", token)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        names = sorted(item["name"] for item in listing["content"] if item["type"] == "notebook")
        assert names == NOTEBOOKS
        spec = get_json(f"{base}/api/kernelspecs", token)["kernelspecs"]["python3"]["spec"]
        assert Path(spec["argv"][0]).parent.resolve() == (Path(sys.prefix) / "bin").resolve(), spec["argv"]
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()
