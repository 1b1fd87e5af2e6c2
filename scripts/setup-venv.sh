#!/usr/bin/env bash
# Creates .venv (if missing) and installs deskpool with its dev extras into it, at the versions
# requirements.lock pins. Skips pip when neither file changed since the last successful install.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv="$repo/.venv"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi

stamp="$venv/.deskpool-installed"
want=$(cat "$repo/pyproject.toml" "$repo/requirements.lock" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[dev]" -c "$repo/requirements.lock"
  echo "$want" >"$stamp"
fi
