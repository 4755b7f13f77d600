#!/usr/bin/env bash
# JupyterLab on notebooks/ with the project's kernel, as `make lab` starts it (tests/test_lab.py starts it the same way).
# Headless-safe: no browser is opened (open the link it prints); --allow-root only when run as root, as in a
# container. JUPYTER_PATH puts the venv's kernel (the package's Python, installed by `make install`) ahead of any
# user-level kernel named python3. Extra arguments go to `jupyter lab` (e.g. --ServerApp.port=8890).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
case $venv in /*) ;; *) venv=$PWD/$venv ;; esac
root=()
if [ "$(id -u)" -eq 0 ]; then root=(--allow-root); fi
export JUPYTER_PATH="$venv/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
exec "$venv/bin/jupyter" lab --notebook-dir=notebooks --no-browser "${root[@]}" "$@"
