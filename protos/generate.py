"""Regenerates the checked-in Python code for protos/shardstate/v1/*.proto.

Run `python protos/generate.py` after editing a proto; `--check` exits 1 when the
checked-in files differ from a fresh generation (CI runs that). `regenerate()` also serves
benchmarks/etcd_pb/generate.py.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PKG = ROOT / "shardstate" / "v1"
SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def _generate(protos: Sequence[Path], package_path: Path, out: Path) -> Path:
    """Compile `protos` as if they lived at `package_path` (so generated imports read
    `from <package> import ..._pb2`); returns the folder holding the generated files."""
    src, gen = out / "src", out / "gen"
    (src / package_path).mkdir(parents=True)
    gen.mkdir()
    for proto in protos:
        shutil.copyfile(proto, src / package_path / proto.name)
    include = str(Path(protoc.__file__).parent / "_proto")
    bindir = Path(sys.executable).parent
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
        *sorted(str(package_path / p.name) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return gen / package_path


def _generated(base: Path) -> dict[str, Path]:
    return {p.name: p for p in base.iterdir() if p.name.endswith(SUFFIXES)}


def regenerate(dest: Path, package_path: Path, check: bool, rerun: str) -> int:
    """Regenerate the code for dest/*.proto into dest, or with `check` only report staleness."""
    protos = sorted(dest.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generated(_generate(protos, package_path, Path(tmp)))
        current = _generated(dest)
        if check:
            stale = sorted(
                n for n in fresh.keys() | current.keys()
                if n not in fresh or n not in current or not filecmp.cmp(fresh[n], current[n], shallow=False)
            )
            if stale:
                print(f"generated code in {dest.name} is stale; run: {rerun}")
                for name in stale:
                    print("  ", name)
                return 1
            print(f"generated code in {dest.name} is up to date")
            return 0
        for name in current.keys() - fresh.keys():
            current[name].unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, dest / name)
        print(f"wrote {len(fresh)} files to {dest}")
    return 0


def main() -> int:
    return regenerate(PKG, Path("shardstate") / "v1", "--check" in sys.argv[1:], "python protos/generate.py")


if __name__ == "__main__":
    sys.exit(main())
