"""`shardstate admin backup DIR` and `shardstate admin restore DIR`: the backup files, written
and read on the operator's machine from the chunks Admin.Backup streams (docs/design.md §13).

A backup is a directory (or, with `--tar`, one tar file holding the same names):

    manifest.json       format, version, created, map epoch, the cluster map, per shard: file,
                        revision (the snapshot point), node, counts, bytes, sha256; written last
    shards/ID.chunks    the shard's BackupChunk messages as streamed, each framed as
                        length:u32be message

It is written under `.NAME.partial-PID` beside the destination and renamed into place once the
manifest is in, so an interrupted backup leaves nothing `restore` takes for a backup.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format

from shardstate.common import errors, tls
from shardstate.common.authwire import with_token
from shardstate.v1 import admin_pb2, admin_pb2_grpc

FORMAT = "shardstate-backup"
VERSION = 1
MANIFEST = "manifest.json"
FRAME = struct.Struct(">I")
COUNTS = ("entries", "sessions", "records", "log_entries", "idempotency", "tombstones")
SHARD_FIELDS = {"id": str, "file": str, "revision": int, "epoch": int, "node": str, "taken_at_ms": int,
                "counts": dict, "bytes": int, "sha256": str}


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


# ---- reading a backup ----


class _Serialized(io.RawIOBase):
    """A tar member read under the tar's lock: every member of a TarFile reads through its one
    file object (seek, then read), so members read from several threads at once (a restore
    sends every shard at once) must take turns, or one reads another's bytes."""

    def __init__(self, f: IO[bytes], lock: threading.Lock) -> None:
        self._f, self._lock = f, lock

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        with self._lock:
            data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


class Source:
    """The files of a backup: a directory or a tar file of the same names."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._lock = threading.Lock()
        if path.is_dir():
            return
        if not path.exists():
            raise BackupError(f"no backup at {path}: no such file or directory")
        if not tarfile.is_tarfile(path):
            raise BackupError(f"{path} is neither a backup directory nor a tar file")
        self._tar = tarfile.open(path)  # noqa: SIM115  # closed by close()

    def open(self, name: str) -> IO[bytes]:
        if self._tar is None:
            try:
                return (self.path / name).open("rb")
            except FileNotFoundError:
                raise BackupError(self._missing(name)) from None
        try:
            f = self._tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise BackupError(self._missing(name))
        return io.BufferedReader(_Serialized(f, self._lock), 1 << 16)

    def _missing(self, name: str) -> str:
        if name == MANIFEST:
            return (f"{self.path} holds no {MANIFEST}: not a complete backup (a backup writes its "
                    "manifest last, so an interrupted one has none)")
        return f"{self.path}: {name} is missing; the backup is damaged"

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


class Backup:
    """A backup opened and checked: `manifest` (the parsed JSON), `cluster_map`, `shards`."""

    def __init__(self, path: Path) -> None:
        self.source = Source(path)
        self.path = path
        with self.source.open(MANIFEST) as f:
            raw = f.read()
        self.manifest = parse_manifest(raw, f"{path}/{MANIFEST}")
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.cluster_map = json_format.ParseDict(self.manifest["cluster_map"], admin_pb2.ClusterMap())

    def verify(self, progress: Any = None) -> None:
        """Every shard file's size and sha256 against the manifest, and its frames: a header
        naming the shard, then chunks carrying exactly the counted entries, the last marked."""
        for s in self.shards:
            where = f"shard {s['id']} ({s['file']})"
            task = progress.add_task(f"verify {s['id']}", total=2 * s["bytes"]) if progress else None
            digest = hashlib.sha256()
            size = 0
            with self.source.open(s["file"]) as f:  # the checksum first: damage is named as such
                while block := f.read(1 << 20):
                    digest.update(block)
                    size += len(block)
                    if progress:
                        progress.advance(task, len(block))
            if digest.hexdigest() != s["sha256"] or size != s["bytes"]:
                raise BackupError(f"checksum mismatch for {where}: the manifest says {s['bytes']} bytes, sha256 "
                                  f"{s['sha256'][:16]}…; the file has {size} bytes, sha256 {digest.hexdigest()[:16]}…; "
                                  "the backup is damaged")
            entries = 0
            header: admin_pb2.BackupHeader | None = None
            last = False
            with self.source.open(s["file"]) as f:
                for frame, msg in frames(f, s["file"]):
                    if progress:
                        progress.advance(task, len(frame))
                    if header is None:
                        header = msg.header
                        continue
                    entries += len(msg.snapshot.ops)
                    last = msg.snapshot.last
            if header is None or header.shard_id != s["id"] or header.revision != s["revision"]:
                raise BackupError(f"{where}: its header does not match the manifest; the backup is damaged")
            if not last or entries != s["counts"]["entries"]:
                raise BackupError(f"{where}: {entries} of {s['counts']['entries']} entries"
                                  f"{'' if last else ', no last chunk'}; the backup is damaged")

    def chunks(self, shard: dict[str, Any], advance: Callable[[int], None]) -> Iterator[admin_pb2.BackupChunk]:
        with self.source.open(shard["file"]) as f:
            for frame, msg in frames(f, shard["file"]):
                advance(len(frame))
                yield msg

    def close(self) -> None:
        self.source.close()


def frames(f: IO[bytes], name: str) -> Iterator[tuple[bytes, admin_pb2.BackupChunk]]:
    """(frame bytes, message) for each frame of a shard file."""
    while True:
        head = f.read(FRAME.size)
        if not head:
            return
        if len(head) < FRAME.size:
            raise BackupError(f"{name} ends inside a frame header; the backup is damaged")
        (n,) = FRAME.unpack(head)
        body = f.read(n)
        if len(body) < n:
            raise BackupError(f"{name} ends inside a frame ({len(body)} of {n} bytes); the backup is damaged")
        try:
            msg = admin_pb2.BackupChunk.FromString(body)
        except Exception as e:
            raise BackupError(f"{name} holds a frame that is not a BackupChunk ({e}); the backup is damaged") from e
        yield head + body, msg


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    def corrupt(why: str) -> BackupError:
        return BackupError(f"{where} is corrupt: {why}")

    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise corrupt(f"not JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise corrupt(f"not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise corrupt(f"format version {m.get('version')!r}; this shardstate reads version {VERSION}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise corrupt("no shards listed")
    if not isinstance(m.get("cluster_map"), dict) or not isinstance(m.get("epoch"), int):
        raise corrupt("no cluster map or epoch")
    for s in shards:
        for field, kind in SHARD_FIELDS.items():
            if not isinstance(s, dict) or not isinstance(s.get(field), kind):
                raise corrupt(f"a shard entry lacks {field!r} ({kind.__name__})")
        if not all(isinstance(s["counts"].get(c), int) for c in COUNTS):
            raise corrupt(f"shard {s['id']}: counts lack one of {', '.join(COUNTS)}")
        if "/" not in s["file"] or ".." in s["file"]:
            raise corrupt(f"shard {s['id']}: bad file name {s['file']!r}")
    try:
        json_format.ParseDict(m["cluster_map"], admin_pb2.ClusterMap())
    except json_format.ParseError as e:
        raise corrupt(f"cluster_map: {e}") from None
    return m


# ---- taking a backup ----


def take(stub: admin_pb2_grpc.AdminStub, dest: Path, tar: bool, progress: Any = None,
         router: str = "") -> dict[str, Any]:
    """Back up every shard of the cluster behind `stub` into `dest`; returns the manifest."""
    if dest.exists() and not (dest.is_dir() and not tar and not any(dest.iterdir())):
        raise BackupError(f"{dest} exists{' and holds files' if dest.is_dir() else ''}; "
                          "a backup goes to a new path (or an empty directory)")
    if not dest.parent.is_dir():
        raise BackupError(f"{dest.parent} is not a directory")
    pb = stub.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=30)
    if not pb.epoch or not pb.shards:
        raise BackupError("the cluster has no cluster map yet (epoch 0): nothing to back up")
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        (tmp / "shards").mkdir()
        entries = _pull_all(stub, pb, tmp, progress)
        manifest = {
            "format": FORMAT, "version": VERSION, "created_at_ms": int(time.time() * 1000),
            "router": router, "epoch": pb.epoch, "cluster_id": pb.cluster_id,
            "cluster_map": json_format.MessageToDict(pb), "shards": entries,
        }
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
        _fsync_dir(tmp / "shards")
        _fsync_dir(tmp)
        if tar:
            _tar(tmp, dest, [e["file"] for e in entries])
            shutil.rmtree(tmp)
        else:
            if dest.is_dir():
                dest.rmdir()  # empty, checked above
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pull_all(stub: admin_pb2_grpc.AdminStub, pb: admin_pb2.ClusterMap, tmp: Path, progress: Any) -> list[dict[str, Any]]:
    """Every shard's stream at once (their snapshots are taken as the calls arrive), each into
    its file; the first failure cancels the rest."""
    calls: dict[str, Any] = {}
    lock = threading.Lock()
    failed = threading.Event()

    def pull(shard_id: str) -> dict[str, Any]:
        task = progress.add_task(f"backup {shard_id}", total=None) if progress else None
        name = f"shards/{shard_id}.chunks"
        digest = hashlib.sha256()
        size = entries = 0
        header: admin_pb2.BackupHeader | None = None
        last = False
        with lock:
            if failed.is_set():
                raise BackupError("cancelled")
            call = calls[shard_id] = stub.Backup(admin_pb2.BackupRequest(shard_id=shard_id, epoch=pb.epoch))
        with (tmp / name).open("wb") as f:
            for msg in call:
                body = msg.SerializeToString()
                frame = FRAME.pack(len(body)) + body
                f.write(frame)
                digest.update(frame)
                size += len(frame)
                if header is None:
                    if not msg.HasField("header"):
                        raise BackupError(f"shard {shard_id}: the stream did not start with a header")
                    header = msg.header
                    if progress:
                        progress.update(task, total=header.counts.entries)
                    continue
                entries += len(msg.snapshot.ops)
                last = msg.snapshot.last
                if progress:
                    progress.advance(task, len(msg.snapshot.ops))
            f.flush()
            os.fsync(f.fileno())
        if header is None or not last or entries != header.counts.entries:
            raise BackupError(f"shard {shard_id}: the stream ended after {entries} entries"
                              f"{'' if header is None else f' of {header.counts.entries}'} without its last chunk")
        if header.epoch != pb.epoch:
            raise BackupError(f"shard {shard_id} took its snapshot at map epoch {header.epoch}, not {pb.epoch}; "
                              "run the backup again")
        return {"id": shard_id, "file": name, "revision": header.revision, "epoch": header.epoch,
                "node": header.node, "taken_at_ms": header.taken_at_ms,
                "counts": {c: getattr(header.counts, c) for c in COUNTS},
                "bytes": size, "sha256": digest.hexdigest()}

    ids = [s.id for s in pb.shards]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        futs = {pool.submit(pull, i): i for i in ids}
        done, _ = wait(futs, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            with lock:
                failed.set()
                for c in calls.values():
                    c.cancel()
            wait(futs)
    errs = [f.exception() for f in futs if f.exception() is not None]
    real = [e for e in errs if not _cancelled(e)]
    if errs:
        raise (real or errs)[0]  # type: ignore[misc]
    return [f.result() for f in futs]


def _cancelled(e: BaseException | None) -> bool:
    if (isinstance(e, BackupError) and str(e) == "cancelled") or isinstance(e, grpc.FutureCancelledError):
        return True
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tar(tmp: Path, dest: Path, files: list[str]) -> None:
    part = tmp.with_name(tmp.name + ".tar")
    with tarfile.open(part, "w") as t:
        for name in [*files, MANIFEST]:  # the manifest last, as in a directory
            t.add(tmp / name, arcname=name)
    with part.open("rb") as f:
        os.fsync(f.fileno())
    os.rename(part, dest)


# ---- restoring ----


def check_target(backup: Backup, pb: admin_pb2.ClusterMap, router: str) -> None:
    """The cluster must have the backup's shard ids and weights: sessions are placed by the
    ring over them, so each shard's backup belongs on the shard of the same id."""
    want = {s.id: s.weight or 1 for s in backup.cluster_map.shards}
    have = {s.id: s.weight or 1 for s in pb.shards}
    if not pb.epoch:
        raise BackupError(f"the cluster at {router} has no cluster map yet; wait until its router is serving")
    if pb.migrations:
        raise BackupError(f"the cluster at {router} is rebalancing (map epoch {pb.epoch}); restore into a "
                          "fresh cluster")
    if want != have:
        def show(d: dict[str, int]) -> str:
            return ", ".join(f"{k}" + (f" (weight {w})" if w != 1 else "") for k, w in sorted(d.items())) or "none"

        raise BackupError(f"the backup holds shards {show(want)}; the cluster at {router} has shards {show(have)}: "
                          "restore needs a cluster with the same shard ids and weights")


def restore(stub: admin_pb2_grpc.AdminStub, backup: Backup, router: str = "",
            progress: Any = None) -> list[admin_pb2.RestoreResponse]:
    """Install every shard's backup into the cluster behind `stub` (every shard empty)."""
    # Whether a shard is empty is the shard's to say (its first answer): a shard whose restore
    # was cut short holds data and takes the restore again.
    check_target(backup, stub.GetClusterMap(admin_pb2.GetClusterMapRequest(), timeout=30), router)
    calls: list[Any] = []
    lock = threading.Lock()
    first: list[BaseException] = []  # errors in the order they came: the first is the cause

    def push(shard: dict[str, Any]) -> admin_pb2.RestoreResponse:
        task = progress.add_task(f"restore {shard['id']}", total=shard["bytes"]) if progress else None

        def advance(n: int) -> None:
            if progress:
                progress.advance(task, n)

        with lock:
            fut = stub.Restore.future(backup.chunks(shard, advance))
            calls.append(fut)
        try:
            resp: admin_pb2.RestoreResponse = fut.result()
        except BaseException as e:
            with lock:
                first.append(e)
            raise
        return resp

    with ThreadPoolExecutor(max_workers=len(backup.shards)) as pool:
        futs = [pool.submit(push, s) for s in backup.shards]
        done, _ = wait(futs, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            with lock:
                for c in calls:
                    c.cancel()
            wait(futs)
    # The other shards' calls, cancelled once one failed, may end CANCELLED or, when the cancel
    # meets their stream mid-way at the router, UNAVAILABLE: the error that came first is the cause.
    errs = first or [e for e in (f.exception() for f in futs) if e is not None]
    real = [e for e in errs if not _cancelled(e)]
    if errs:
        raise (real or errs)[0]
    return [f.result() for f in futs]


def open_checked(path: Path, progress: Any = None) -> Backup:
    backup = Backup(path)
    try:
        backup.verify(progress)
    except BaseException:
        backup.close()
        raise
    return backup


def restore_into(router: str, backup: Backup, token: str | None = None) -> list[admin_pb2.RestoreResponse]:
    """`restore` through a channel of its own (for `shardstate dev --restore`)."""
    try:
        with tls.channel(router) as ch:
            return restore(admin_pb2_grpc.AdminStub(with_token(ch, token)), backup, router)
    except grpc.RpcError as e:
        err = errors.from_rpc_error(e)
        raise BackupError(f"{err.code.name}: {err.message}") from None
    finally:
        backup.close()


def dev_shard_count(backup: Backup, shards: int | None) -> int:
    """`shardstate dev --restore`: the number of shards (named s1…sN by dev) the backup needs."""
    ids = sorted(s["id"] for s in backup.shards)
    n = len(ids)
    if ids != sorted(f"s{i}" for i in range(1, n + 1)):
        raise BackupError(f"the backup holds shards {', '.join(ids)}; shardstate dev names its shards s1…sN: "
                          "restore it into a cluster started with those ids (shardstate admin restore)")
    if shards is not None and shards != n:
        raise BackupError(f"the backup holds {n} shards; --shards {shards} differs (leave --shards out)")
    return n


# ---- the commands ----


def progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _fail(e: BackupError) -> int:
    import sys

    print(f"error: {e}", file=sys.stderr)
    return 1


def backup_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    dest = Path(args.dir)
    try:
        with progress_bar() as progress:
            manifest = take(stub, dest, args.tar, progress, router=args.router)
    except BackupError as e:
        return _fail(e)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    from rich.table import Table

    from .status import console, human_bytes

    table = Table("shard", "revision", "sessions", "keys", "log", "size", "sha256",
                  title=f"backup at map epoch {manifest['epoch']}")
    for s in manifest["shards"]:
        c = s["counts"]
        table.add_row(s["id"], str(s["revision"]), str(c["sessions"]), str(c["records"]), str(c["log_entries"]),
                      human_bytes(s["bytes"]), s["sha256"][:8])
    console().print(table)
    print(f"backup written to {dest}")
    return 0


def restore_cmd(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    try:
        with progress_bar() as progress:
            backup = open_checked(Path(args.dir), progress)
            try:
                out = restore(stub, backup, args.router, progress)
            finally:
                backup.close()
    except BackupError as e:
        return _fail(e)
    if args.json:
        print(json.dumps([json_format.MessageToDict(r, preserving_proto_field_name=True) for r in out], indent=2))
        return 0
    for r in out:
        print(f"shard {r.shard_id}: {r.entries} entries restored on {r.node}, revisions continue above {r.revision}")
    return 0


COMMANDS: dict[str, tuple[Callable[[admin_pb2_grpc.AdminStub, argparse.Namespace], int], str]] = {
    "backup": (backup_cmd, "a consistent snapshot of every shard into a new directory: backup DIR [--tar]"),
    "restore": (restore_cmd, "install a backup into a fresh cluster with the same shard ids: restore DIR"),
}


def add_arguments(name: str, sp: argparse.ArgumentParser) -> None:
    if name == "backup":
        sp.add_argument("dir", help="where to write the backup (must not exist, or be empty)")
        sp.add_argument("--tar", action="store_true", help="write one tar file at DIR instead of a directory")
    elif name == "restore":
        sp.add_argument("dir", help="a backup directory or tar file written by `shardstate admin backup`")
