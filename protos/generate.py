"""Regenerates the checked-in Python code for protos/shardstate/v1/*.proto.

Run `python protos/generate.py` after editing a proto; `--check` exits 1 when the
checked-in files differ from a fresh generation (CI runs that).
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PKG = ROOT / "shardstate" / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in PKG.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated(base: Path) -> dict[str, Path]:
    return {p.name: p for p in (base / "shardstate" / "v1").iterdir() if p.name.endswith(SUFFIXES)}


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated(Path(tmp))
        current = generated(ROOT)
        if check:
            stale = sorted(
                n for n in fresh.keys() | current.keys()
                if n not in fresh or n not in current or not filecmp.cmp(fresh[n], current[n], shallow=False)
            )
            if stale:
                print("generated protobuf code is stale; run: python protos/generate.py")
                for name in stale:
                    print("  ", name)
                return 1
            print("generated protobuf code is up to date")
            return 0
        for name in current.keys() - fresh.keys():
            current[name].unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, PKG / name)
        print(f"wrote {len(fresh)} files to {PKG.relative_to(ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
