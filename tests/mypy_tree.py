"""mypy over the package as it is installed: `.mypy-tree/shardstate/...` is built from symlinks
following pyproject.toml's package-dir (client/ -> shardstate, server/ -> shardstate.server,
...), so mypy resolves every `shardstate.*` import to its source. (Run on the directories
themselves, mypy cannot map the import names to them and treats each other module as Any.)
Extra arguments go to mypy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".mypy-tree"


def build() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs: dict[str, str] = cfg["package-dir"]
    shutil.rmtree(TREE, ignore_errors=True)
    for package in cfg["packages"]:
        parts = package.split(".")
        # the longest mapped prefix says where the package's files are
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in dirs:
                src = ROOT / dirs[prefix] / Path(*parts[n:])
                break
        else:
            raise SystemExit(f"{package}: no package-dir entry")
        out = TREE / Path(*parts)
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and (f.suffix in (".py", ".pyi") or f.name == "py.typed"):
                os.symlink(f, out / f.name)


def main() -> int:
    build()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "shardstate",
           *sys.argv[1:]]
    return subprocess.run(cmd, cwd=TREE).returncode


if __name__ == "__main__":
    raise SystemExit(main())
