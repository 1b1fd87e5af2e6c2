#!/usr/bin/env bash
# Creates .venv (if missing) and installs deskpool with its dev extras into it.
# Skips pip when pyproject.toml has not changed since the last successful install.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi

stamp="$venv/.deskpool-installed"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[dev]"
  echo "$want" >"$stamp"
fi
