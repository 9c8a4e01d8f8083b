#!/usr/bin/env bash
# The tests, from a fresh clone or not: .venv first if missing (scripts/setup_venv.sh, as
# ./demo.sh does), then pytest. Arguments go to pytest (e.g. scripts/test.sh tests/test_cli.py);
# the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pytest -q "$@"
