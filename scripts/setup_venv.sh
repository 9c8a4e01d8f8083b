#!/usr/bin/env bash
# .venv with the pinned requirements, set up once per requirements.txt (a stamp file named by
# its hash), shared by ./demo.sh and scripts/test.sh so that either can be a clone's first
# command. An existing .venv is reused (only pip runs when the requirements changed).
set -euo pipefail
cd "$(dirname "$0")/.."

stamp=".venv/.requirements-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== setting up .venv (about 80 s on first run)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  touch "$stamp"
fi
