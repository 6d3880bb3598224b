#!/usr/bin/env bash
# The test command: installs everything the tests need (a .venv with the project and its dev
# extras, Debian's redis-server and etcd-server for the benchmark peers), then runs the
# generated-code check, ruff, mypy and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
if [ -x benchmarks/install-peers.sh ]; then
  benchmarks/install-peers.sh
fi

echo "== generated protobuf code"
.venv/bin/python protos/generate.py --check
.venv/bin/python benchmarks/etcd_pb/generate.py --check
echo "== ruff"
.venv/bin/ruff check client server router tests benchmarks protos/generate.py deploy
echo "== mypy"
.venv/bin/python tests/mypy_tree.py
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
