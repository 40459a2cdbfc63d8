#!/usr/bin/env bash
# Re-resolve constraints.txt: every package a fresh `make install` puts in .venv, pinned exactly.
# Builds a throw-away venv, installs torch and '.[test,eval,serve,ray]' as the Makefile does, but without
# the old pins (the newest versions pyproject.toml allows), and writes `pip freeze` of it.
#
#   make lock                                    # move every pin forward
#   make lock HOLD="transformers==5.23.0"        # ... but keep some where they are
#
# Then `make clean test`, and commit constraints.txt with the result (README: "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-$(sed -n 's/^torch==//p' constraints.txt 2>/dev/null || true)}
TORCH=${TORCH:-2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q --upgrade pip
printf '%s\n' ${HOLD:-} > "$tmp/hold.txt"
"$py" -m pip install -q "torch==$TORCH"
"$py" -m pip install -q -c "$tmp/hold.txt" '.[test,eval,serve,ray]'
{
  echo "# Exact versions of everything \`make install\` puts in .venv (Python $("$py" -c 'import sys; print(*sys.version_info[:2], sep=".")'), CPU torch)."
  echo "# Written by \`make lock\` (scripts/lock.sh) on $(date -u +%Y-%m-%d); used by the Makefile (pip -c) and"
  echo "# scripts/gpu-wheels.sh. Do not edit by hand: re-run \`make lock\`."
  # local version labels (+cpu) dropped: the pin then matches the CPU and the CUDA build alike
  "$py" -m pip freeze --exclude-editable | grep -v -i '^streamedit[= @]' | sed 's/+[A-Za-z0-9.]*$//' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
