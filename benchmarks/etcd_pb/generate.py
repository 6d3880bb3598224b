"""Regenerates the checked-in Python stubs for benchmarks/etcd_pb/*.proto (etcd's KV subset).

Run `python benchmarks/etcd_pb/generate.py`; `--check` exits 1 when the checked-in files differ.
The work is protos/generate.py's `regenerate()`, loaded from its file (protos/ is no package).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Installed as shardstate.bench.etcd_pb (pyproject package-dir), so the generated imports
# must read `from shardstate.bench.etcd_pb import ...`.
PKG_PATH = Path("shardstate") / "bench" / "etcd_pb"


def main() -> int:
    spec = importlib.util.spec_from_file_location("protos_generate", HERE.parents[1] / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return int(gen.regenerate(HERE, PKG_PATH, "--check" in sys.argv[1:], "python benchmarks/etcd_pb/generate.py"))


if __name__ == "__main__":
    sys.exit(main())
