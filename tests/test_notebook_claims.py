"""Numbers in the notebooks' prose are guarded by asserts: a stored result that stops supporting a claim
fails the nbval run (as CI runs it), instead of leaving the prose to mislead a reader."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from semla_lab.core.runtime import assets_dir

ROOT = Path(__file__).resolve().parent.parent


def test_notebook_07_fails_when_the_benchmark_no_longer_supports_its_prose(tmp_path):
    assets = tmp_path / "assets"
    shutil.copytree(assets_dir(), assets)
    path = assets / "benchmark" / "results.json"
    payload = json.loads(path.read_text())
    assert payload["results"]["semla"]["per_domain"]["nyu"] < payload["results"]["zero_shot"]["per_domain"]["nyu"]
    payload["results"]["semla"]["per_domain"]["nyu"] = 35.0     # the prose says SemLA loses to zero-shot on nyu
    path.write_text(json.dumps(payload))
    notebook = json.loads((ROOT / "notebooks" / "07_leave_one_out_results.ipynb").read_text())
    for cell in notebook["cells"]:     # outputs unchecked: only the asserts guarding the prose can fail
        cell["source"] = [line for line in cell["source"] if "NBVAL_CHECK_OUTPUT" not in line]
    (tmp_path / "07.ipynb").write_text(json.dumps(notebook))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-x", "-p", "no:cacheprovider",
         "--nbval-sanitize-with", str(ROOT / "notebooks" / "sanitize.cfg"),
         str(tmp_path / "07.ipynb")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "SEMLA_ASSETS": str(assets), "SEMLA_THREADS": "1"})
    out = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout)                     # nbval colours its tracebacks
    assert run.returncode == 1 and "1 failed" in out and "Cell 7" in out, out[-3000:]   # the per-domain claims cell
    assert 'assert below_zs == {"nyu"} and -1 < deltas.loc["nyu", "semla - zero_shot"] < 0' in out, out[-3000:]
    assert re.search(r"semla - zero_shot\s+5\.4", out) and "Name: nyu" in out, out[-3000:]   # NYU's row, now +5.4
