"""Regenerates the checked-in Python stubs for benchmarks/etcd_pb/*.proto (etcd's KV subset).

Run `python benchmarks/etcd_pb/generate.py`; `--check` exits 1 when the checked-in files differ.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
# The directory is installed as shardstate.bench.etcd_pb (pyproject package-dir); protoc must see
# the protos under that path so the generated imports read `from shardstate.bench.etcd_pb import`.
PKG_PATH = Path("shardstate") / "bench" / "etcd_pb"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    src = out / "src"
    (src / PKG_PATH).mkdir(parents=True)
    for proto in sorted(HERE.glob("*.proto")):
        shutil.copyfile(proto, src / PKG_PATH / proto.name)
    include = str(Path(protoc.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
    gen = out / "gen"
    gen.mkdir()
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{src}",
        f"-I{include}",
        f"--python_out={gen}",
        f"--grpc_python_out={gen}",
        f"--mypy_out={gen}",
        f"--mypy_grpc_out={gen}",
        *sorted(str(PKG_PATH / p.name) for p in HERE.glob("*.proto")),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated(base: Path) -> dict[str, Path]:
    return {p.name: p for p in base.iterdir() if p.name.endswith(SUFFIXES)}


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated(Path(tmp) / "gen" / PKG_PATH)
        current = generated(HERE)
        if check:
            stale = sorted(
                n for n in fresh.keys() | current.keys()
                if n not in fresh or n not in current or not filecmp.cmp(fresh[n], current[n], shallow=False)
            )
            if stale:
                print("generated etcd stubs are stale; run: python benchmarks/etcd_pb/generate.py")
                for name in stale:
                    print("  ", name)
                return 1
            print("generated etcd stubs are up to date")
            return 0
        for name in current.keys() - fresh.keys():
            current[name].unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, HERE / name)
        print(f"wrote {len(fresh)} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
