#!/usr/bin/env bash
# What tests/test_browser.py (and tests/test_serve.py) need, called by .ci/run:
#   * Debian's chromium (the e2e test drives the system browser; no browser is ever downloaded:
#     `playwright install` cannot work on these machines),
#   * the Python packages of the `serve` extra (aiohttp, aiortc) and playwright (its driver only).
# Idempotent and quiet; safe to run on a machine that already has everything.
set -euo pipefail

PY="${PYTHON:-python}"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version

"$PY" -m pip install -q "aiohttp>=3.9" "aiortc>=1.9" "playwright>=1.45"
"$PY" -c "import aiohttp, aiortc, playwright; print('serve test deps ok: aiortc', aiortc.__version__)"
