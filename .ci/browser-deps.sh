#!/usr/bin/env bash
# What tests/test_browser.py and tests/test_serve.py need; .ci/run calls this before `make test`.
#   * Debian's chromium: the e2e test drives the system browser. No browser is ever downloaded
#     (`playwright install` cannot work on these machines: only package registries are reachable).
#   The Python side (aiohttp + aiortc: the `serve` extra; playwright's driver: the `test` extra) is
#   installed by `make test` from pyproject.toml.
# Idempotent and quiet; safe to run where everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version 2>/dev/null | head -1
