"""How the LangGraph savers store threads, and the plan of every saver method (run by
langgraph_driver's sync or async driver).

Each thread is one shardstate session (`{prefix}t/{thread_id}`), so all of a thread is on one
shard and one `Txn` stores a checkpoint with its new channel blobs. Keys of a thread session
(every name segment escaped by `enc`):

    c/{ns}/{checkpoint_id}             the checkpoint (without channel values), metadata, parent
    h/{ns}                             "{checkpoint_id}\\0" + the same record: the newest one
    b/{ns}/{channel}/{version}         a channel's value at a version: stored once per version
    w/{ns}/{checkpoint_id}/{task_id}/{idx}   one pending write; (task_id, idx) is its identity
    x/{key}/{token}/{i}                a part of a large blob or write stored at `key` (which
                                       then holds only b"\xc1" + [token, parts]); the parts
                                       are committed before the Txn that refers to them

A run index session per run (`{prefix}r/{run_id}`, keys `t/{thread_id}`) names the threads a
run wrote to, for `delete_for_runs`. The session TTL (`ttl=`) is sent with every write, so an
idle thread expires that long after its last write; `prune` and `delete_thread` free space
before that.
"""

from __future__ import annotations

import random
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import ormsgpack
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from shardstate import Record, ShardstateError, TxnResult

from .langgraph_driver import (
    Commit,
    Drop,
    Get,
    Plan,
    Request,
    Scan,
    Sessions,
    Writes,
    dec,
    enc,
)

DEFAULT_PREFIX = "lg/"
_LIST_CHUNK = 64  # checkpoints whose writes and blobs one step of list() reads
BLOB_CACHE_BYTES = 32 << 20  # channel values this process wrote, kept to skip reading them back
PART_BYTES = 256 << 10  # a value this large is stored in parts (the server's default limit
INLINE_BYTES = 2 << 20  # is 1 MiB a value, 4 MiB a request); and more go out of line
TXN_KEYS = 250  # keys one put or put_writes Txn writes at most (the server takes 1000 ops)
_PARTED = 0xC1  # the first byte of a parted value (never the start of a msgpack value)


def _ckey(ns: str, cid: str) -> str:
    return f"c/{enc(ns)}/{enc(cid)}"


def _hkey(ns: str) -> str:
    return f"h/{enc(ns)}"


def _bkey(ns: str, channel: str, version: Any) -> str:
    return f"b/{enc(ns)}/{enc(channel)}/{enc(str(version))}"


def _wprefix(ns: str, cid: str) -> str:
    return f"w/{enc(ns)}/{enc(cid)}/"


def _wkey(ns: str, cid: str, task_id: str, idx: int) -> str:
    return f"{_wprefix(ns, cid)}{enc(task_id)}/{idx}"


def _outline(sid: str, items: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], list[Commit]]:
    """`items` with every large value (and, while they add up to more than INLINE_BYTES,
    the largest others) replaced by a reference to its parts, and the Txns that store the
    parts (to commit first). A part's key has a random token: a write that loses to an earlier
    one leaves only unreferenced parts, which prune and delete_for_runs reclaim."""
    out = list(items)
    total = sum(len(v) for _, v in out)
    if total <= INLINE_BYTES and all(len(v) < PART_BYTES for _, v in out):
        return out, []
    parts = Writes(sid)
    for i in sorted(range(len(out)), key=lambda i: -len(out[i][1])):
        key, value = out[i]
        if len(value) < PART_BYTES and total <= INLINE_BYTES:
            break
        token = secrets.token_hex(8)
        n = -(-len(value) // PART_BYTES)
        for j in range(n):
            parts.puts.append((f"x/{key}/{token}/{j}", value[j * PART_BYTES:(j + 1) * PART_BYTES]))
        ref = bytes([_PARTED]) + ormsgpack.packb([token, n])
        out[i] = (key, ref)
        total += len(ref) - len(value)
    return out, parts.chunks()


def _part_keys(key: str, value: bytes) -> list[str]:
    """The keys of a parted value's parts ([] for a value stored whole)."""
    if not value or value[0] != _PARTED:
        return []
    token, n = ormsgpack.unpackb(value[1:])
    return [f"x/{key}/{token}/{j}" for j in range(n)]


def _inflate(sid: str, items: list[tuple[str, bytes | None]]) -> Plan[list[bytes | None]]:
    """The values of `items` with every parted one read back whole (one more round trip
    when there is any)."""
    wanted = {i: _part_keys(k, v) for i, (k, v) in enumerate(items) if v}
    wanted = {i: keys for i, keys in wanted.items() if keys}
    values = [v for _, v in items]
    if not wanted:
        return values
    flat = [k for keys in wanted.values() for k in keys]
    got = yield [Get(sid, k) for k in flat]
    found = dict(zip(flat, got, strict=True))
    for i, keys in wanted.items():
        missing = [k for k in keys if found[k] is None]
        if missing:
            raise ShardstateError(f"parts of {items[i][0]!r} are missing ({len(missing)} of "
                                  f"{len(keys)}): the thread's data is damaged")
        values[i] = b"".join(found[k].value for k in keys)
    return values


class _Record:
    """A stored checkpoint: its id, namespace, parent and the serialized parts."""

    __slots__ = ("cid", "ckpt", "md", "metadata", "ns", "parent", "raw")

    def __init__(self, ns: str, cid: str, raw: bytes) -> None:
        self.ns, self.cid, self.raw = ns, cid, raw
        ct, cb, mt, mb, self.parent = ormsgpack.unpackb(raw)
        self.ckpt = (ct, cb)
        self.md = (mt, mb)
        self.metadata: Any = None


class SaverCore:
    """What both savers share: key layout, serialization, and the plans of every method."""

    def __init__(self, saver: BaseCheckpointSaver[Any], prefix: str) -> None:
        self.saver = saver
        self.prefix = prefix
        # the newest checkpoint this process wrote per (thread session, ns): its id and
        # channel versions, so a read of the latest can fetch its writes and blobs in the same
        # round trip as the head (and check it still is the head)
        self.heads: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
        self.indexed: set[tuple[Any, Any]] = set()  # (run_id, thread_id) already in the run index
        # blobs this process wrote, by (thread session, blob key): a blob is never rewritten
        # with another value under the same key, except after the thread was deleted and
        # written again with the same versions, so only versions this saver made (a counter
        # and a random part, see next_version) are kept, and a deleted thread's are dropped
        self.blobs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.blob_bytes = 0
        self.lock = threading.Lock()  # the sync saver's async methods run in worker threads

    @property
    def serde(self) -> SerializerProtocol:
        return self.saver.serde

    def sid(self, thread_id: Any) -> str:
        return f"{self.prefix}t/{thread_id}"

    def run_sid(self, run_id: str) -> str:
        return f"{self.prefix}r/{run_id}"

    def _remember_head(self, sid: str, ns: str, cid: str, versions: dict[str, Any]) -> None:
        with self.lock:
            by_ns = self.heads.get(sid)
            if by_ns is None:
                if len(self.heads) >= 100_000:
                    self.heads.clear()
                by_ns = self.heads[sid] = {}
            old = by_ns.get(ns)
            if old is None or old[0] <= cid:
                by_ns[ns] = (cid, dict(versions))

    def _remember_blob(self, sid: str, key: str, data: bytes) -> None:
        if len(data) > BLOB_CACHE_BYTES // 16:
            return
        with self.lock:
            if (sid, key) in self.blobs:
                return
            self.blobs[(sid, key)] = data
            self.blob_bytes += len(data)
            while self.blob_bytes > BLOB_CACHE_BYTES:
                _, old = self.blobs.popitem(last=False)
                self.blob_bytes -= len(old)

    def _cached_blob(self, sid: str, key: str) -> bytes | None:
        with self.lock:
            data = self.blobs.get((sid, key))
            if data is not None:
                self.blobs.move_to_end((sid, key))
            return data

    # ---- put ----

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> Plan[RunnableConfig]:
        conf = config["configurable"]
        thread_id = conf["thread_id"]
        ns = conf.get("checkpoint_ns", "")
        sid = self.sid(thread_id)
        cid = checkpoint["id"]
        c = checkpoint.copy()
        values: dict[str, Any] = c.pop("channel_values")  # type: ignore[misc]
        dumps = self.serde.dumps_typed
        blobs = [(_bkey(ns, k, v), self._blob(dumps(values[k])), _ours(v))
                 for k, v in new_versions.items() if k in values]
        md = get_checkpoint_metadata(config, metadata)
        ct, cb = dumps(c)
        mt, mb = dumps(md)
        raw = ormsgpack.packb([ct, cb, mt, mb, conf.get("checkpoint_id")])
        ckey, hkey = _ckey(ns, cid), _hkey(ns)
        head = cid.encode() + b"\0" + raw
        known = self.heads.get(sid, {}).get(ns)
        stored, parts = _outline(sid, [(k, b) for k, b, _ in blobs])
        if len(stored) > TXN_KEYS:  # the blobs past a Txn's worth go first, on their own
            early = Writes(sid, puts=stored[TXN_KEYS:])
            stored = stored[:TXN_KEYS]
            parts.extend(early.chunks())
        for part in parts:
            yield [part]

        def write(compare: str) -> Any:
            def build(txn: Any) -> Any:
                if compare == "missing":
                    txn.if_missing(hkey)
                elif compare == "older":
                    txn.if_value(hkey, cid.encode() + b"\0", "<")
                elif compare != "none":
                    txn.if_version(hkey, int(compare))
                if compare != "none":
                    txn.put(hkey, head)
                txn.put(ckey, raw)
                for k, b in stored:
                    txn.put(k, b)
                return txn.otherwise().get(hkey) if compare != "none" else txn
            return build

        reqs: list[Request] = [Commit(sid, write("older" if known is not None else "missing"))]
        run_id = md.get("run_id")
        if run_id and (run_id, thread_id) not in self.indexed:
            reqs.append(Commit(self.run_sid(str(run_id)), _index_put(f"t/{enc(str(thread_id))}")))
        answers = yield reqs
        res: TxnResult = answers[0]
        for _ in range(100):
            if res.succeeded:
                break
            cur: Record | None = res.results[0] if res.results else None
            if cur is None:
                compare = "missing"
            else:
                head_id = cur.value.split(b"\0", 1)[0].decode()
                if head_id < cid:
                    compare = "older"
                elif head_id == cid:
                    compare = str(cur.version)  # the same checkpoint again: it stays the head
                else:
                    compare = "none"  # a newer checkpoint is the head: store this one beside it
            res = (yield [Commit(sid, write(compare))])[0]
        if len(reqs) > 1:
            if len(self.indexed) >= 100_000:
                self.indexed.clear()
            self.indexed.add((run_id, thread_id))
        self._remember_head(sid, ns, cid, checkpoint["channel_versions"])
        for k, b, ours in blobs:
            if ours:
                self._remember_blob(sid, k, b)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": cid}}

    @staticmethod
    def _blob(typed: tuple[str, bytes]) -> bytes:
        return ormsgpack.packb(list(typed))

    # ---- put_writes ----

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str) -> Plan[None]:
        if not writes:
            return None
        conf = config["configurable"]
        sid = self.sid(conf["thread_id"])
        ns = conf.get("checkpoint_ns", "")
        cid = conf["checkpoint_id"]
        dumps = self.serde.dumps_typed
        regular: dict[str, bytes] = {}
        special: dict[str, bytes] = {}
        for i, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, i)
            t, b = dumps(value)
            v = ormsgpack.packb([task_id, channel, t, b, task_path, idx])
            (regular if idx >= 0 else special)[_wkey(ns, cid, task_id, idx)] = v
        # a regular write is stored once per (task_id, idx): the first one stays; a special
        # write (error, interrupt, ...) replaces the one before it
        both, parts = _outline(sid, [*regular.items(), *special.items()])
        for part in parts:
            yield [part]
        regular_items = both[:len(regular)]
        special = dict(both[len(regular):])
        for start in range(0, max(1, len(regular_items)), TXN_KEYS):
            yield from self._store_writes(sid, dict(regular_items[start:start + TXN_KEYS]),
                                          special if start == 0 else {})

    @staticmethod
    def _store_writes(sid: str, regular: dict[str, bytes], special: dict[str, bytes]) -> Plan[None]:
        """One Txn: the regular writes not stored yet (a compare per key; after a conflict,
        the ones still missing, again) and the special ones."""
        pending = dict(regular)
        first = True
        for _ in range(100):
            keys = list(pending)

            def build(txn: Any, keys: list[str] = keys, first: bool = first,
                      pending: dict[str, bytes] = pending) -> Any:
                for k in keys:
                    txn.if_missing(k)
                for k in keys:
                    txn.put(k, pending[k])
                if first:
                    for k, v in special.items():
                        txn.put(k, v)
                txn.otherwise()
                if first:
                    for k, v in special.items():
                        txn.put(k, v)
                for k in keys:
                    txn.get(k)
                return txn

            res: TxnResult = (yield [Commit(sid, build)])[0]
            got = res.results[len(special) if first else 0:]
            first = False
            if res.succeeded:
                return None
            pending = {k: pending[k] for k, rec in zip(keys, got, strict=True) if rec is None}
            if not pending:
                return None
        return None

    # ---- reads ----

    def get_tuple(self, config: RunnableConfig) -> Plan[CheckpointTuple | None]:
        conf = config["configurable"]
        thread_id = conf["thread_id"]
        ns = conf.get("checkpoint_ns", "")
        sid = self.sid(thread_id)
        cid = get_checkpoint_id(config)
        if cid:
            got, writes = yield [Get(sid, _ckey(ns, cid)), Scan(sid, _wprefix(ns, cid))]
            if got is None:
                return None
            rec = _Record(ns, cid, got.value)
        else:
            # the head, and (when this process wrote the newest checkpoint it knows of) that
            # checkpoint's writes and uncached blobs in the same round trip
            guess = self.heads.get(sid, {}).get(ns)
            reqs: list[Request] = [Get(sid, _hkey(ns))]
            fetch: list[str] = []
            if guess is not None:
                reqs.append(Scan(sid, _wprefix(ns, guess[0])))
                for k, v in guess[1].items():
                    key = _bkey(ns, k, v)
                    if key not in fetch and self._cached_blob(sid, key) is None:
                        fetch.append(key)
                reqs.extend(Get(sid, k) for k in fetch)
            got, *rest = yield reqs
            if got is None:
                return None
            head_id, raw = got.value.split(b"\0", 1)
            rec = _Record(ns, head_id.decode(), raw)
            checkpoint = self.serde.loads_typed(rec.ckpt)
            if guess is not None and guess[0] == rec.cid and checkpoint["channel_versions"] == guess[1]:
                fetched = {k: (r.value if r is not None else None)
                           for k, r in zip(fetch, rest[1:], strict=True)}
                blobs = yield from self._blobs(sid, ns, checkpoint["channel_versions"], fetched)
                values = yield from self._writes(sid, rest[0])
                return self._tuple(thread_id, rec, checkpoint, values, blobs)
            (writes,) = yield [Scan(sid, _wprefix(ns, rec.cid))]
        checkpoint = self.serde.loads_typed(rec.ckpt)
        blobs = yield from self._blobs(sid, ns, checkpoint["channel_versions"], {})
        values = yield from self._writes(sid, writes)
        return self._tuple(thread_id, rec, checkpoint, values, blobs)

    @staticmethod
    def _writes(sid: str, recs: list[Record]) -> Plan[list[bytes]]:
        values = yield from _inflate(sid, [(r.key, r.value) for r in recs])
        return [v for v in values if v is not None]

    def _blobs(self, sid: str, ns: str, versions: dict[str, Any],
               fetched: dict[str, bytes | None]) -> Plan[dict[str, bytes | None]]:
        """Each channel's stored blob at its version: from `fetched`, the cache, or a read."""
        keys = {k: _bkey(ns, k, v) for k, v in versions.items()}
        out: dict[str, bytes | None] = {}
        missing: list[str] = []
        for k, key in keys.items():
            if key in fetched:
                out[k] = fetched[key]
            elif (data := self._cached_blob(sid, key)) is not None:
                out[k] = data
            else:
                missing.append(k)
        if missing:
            got = yield [Get(sid, keys[k]) for k in missing]
            for k, r in zip(missing, got, strict=True):
                out[k] = r.value if r is not None else None
        names = list(out)
        whole = yield from _inflate(sid, [(keys[k], out[k]) for k in names])
        return dict(zip(names, whole, strict=True))

    def _tuple(self, thread_id: Any, rec: _Record, checkpoint: Checkpoint, writes: list[bytes],
               blobs: dict[str, bytes | None]) -> CheckpointTuple:
        loads = self.serde.loads_typed
        values: dict[str, Any] = {}
        for k, b in blobs.items():
            if b is not None:
                t, data = ormsgpack.unpackb(b)
                if t != "empty":
                    values[k] = loads((t, data))
        decoded = [ormsgpack.unpackb(w) for w in writes]
        decoded.sort(key=lambda w: (w[4], w[0], w[5]))  # (task_path, task_id, idx)
        metadata = rec.metadata if rec.metadata is not None else loads(rec.md)
        return CheckpointTuple(
            config={"configurable": {"thread_id": thread_id, "checkpoint_ns": rec.ns,
                                     "checkpoint_id": rec.cid}},
            checkpoint={**checkpoint, "channel_values": values},
            metadata=metadata,
            parent_config=({"configurable": {"thread_id": thread_id, "checkpoint_ns": rec.ns,
                                             "checkpoint_id": rec.parent}}
                           if rec.parent else None),
            pending_writes=[(w[0], w[1], loads((w[2], w[3]))) for w in decoded],
        )

    def list_threads(self, config: RunnableConfig | None) -> Plan[list[Any]]:
        if config is not None:
            return [config["configurable"]["thread_id"]]
        sids = (yield [Sessions(f"{self.prefix}t/")])[0]
        return [s[len(self.prefix) + 2:] for s in sids]

    def list_thread(self, thread_id: Any, config: RunnableConfig | None, filter: dict[str, Any] | None,
                    before: RunnableConfig | None, limit: int | None) -> Plan[list[CheckpointTuple]]:
        """The matching checkpoints of one thread, newest first, at most `limit`."""
        sid = self.sid(thread_id)
        conf = config["configurable"] if config is not None else {}
        ns_filter = conf.get("checkpoint_ns")
        want_cid = conf.get("checkpoint_id")
        before_cid = get_checkpoint_id(before) if before else None
        prefix = f"c/{enc(ns_filter)}/" if ns_filter is not None else "c/"
        (found,) = yield [Scan(sid, prefix)]
        recs = []
        for r in found:
            _, ens, ecid = r.key.split("/", 2)
            recs.append(_Record(dec(ens), dec(ecid), r.value))
        recs.sort(key=lambda r: r.cid, reverse=True)
        loads = self.serde.loads_typed
        chosen: list[_Record] = []
        for rec in recs:
            if want_cid and rec.cid != want_cid:
                continue
            if before_cid and rec.cid >= before_cid:
                continue
            rec.metadata = loads(rec.md)
            if filter and not all(rec.metadata.get(k) == v for k, v in filter.items()):
                continue
            if limit is not None and len(chosen) >= limit:
                break
            chosen.append(rec)
        out: list[CheckpointTuple] = []
        for start in range(0, len(chosen), _LIST_CHUNK):
            part = chosen[start:start + _LIST_CHUNK]
            ckpts = [loads(r.ckpt) for r in part]
            reqs: list[Request] = [Scan(sid, _wprefix(r.ns, r.cid)) for r in part]
            keys = sorted({_bkey(r.ns, k, v) for r, c in zip(part, ckpts, strict=True)
                           for k, v in c["channel_versions"].items()})
            keys = [k for k in keys if self._cached_blob(sid, k) is None]
            reqs.extend(Get(sid, k) for k in keys)
            answers = yield reqs
            writes = answers[:len(part)]
            fetched = {k: (r.value if r is not None else None)
                       for k, r in zip(keys, answers[len(part):], strict=True)}
            for r, c, w in zip(part, ckpts, writes, strict=True):
                blobs = yield from self._blobs(sid, r.ns, c["channel_versions"], fetched)
                values = yield from self._writes(sid, w)
                out.append(self._tuple(thread_id, r, c, values, blobs))
        return out

    # ---- deletion, copy, prune ----

    def delete_thread(self, thread_id: Any) -> Plan[None]:
        yield [Drop(self.sid(thread_id))]
        self._forget(self.sid(thread_id))

    def _forget(self, sid: str) -> None:
        """Drop what this process remembers of a thread it deleted or rewrote."""
        with self.lock:
            self.heads.pop(sid, None)
            for key in [k for k in self.blobs if k[0] == sid]:
                self.blob_bytes -= len(self.blobs.pop(key))

    def delete_for_runs(self, run_ids: Sequence[str]) -> Plan[None]:
        runs = {str(r) for r in run_ids}
        if not runs:
            return None
        lists = yield [Scan(self.run_sid(r), "t/", keys_only=True) for r in sorted(runs)]
        threads = sorted({dec(rec.key[2:]) for found in lists for rec in found})
        for thread_id in threads:
            yield from self._rewrite(thread_id, lambda recs: [
                r for r in recs if (r.metadata or {}).get("run_id") not in runs])
        yield [Drop(self.run_sid(r)) for r in sorted(runs)]
        self.indexed = {x for x in self.indexed if x[0] not in runs}
        return None

    def prune(self, thread_ids: Sequence[str], strategy: str) -> Plan[None]:
        if strategy == "delete":
            if thread_ids:
                yield [Drop(self.sid(t)) for t in thread_ids]
            for t in thread_ids:
                self._forget(self.sid(t))
            return None
        if strategy != "keep_latest":
            raise ValueError(f"prune strategy must be 'keep_latest' or 'delete', got {strategy!r}")

        def newest(recs: list[_Record]) -> list[_Record]:
            best: dict[str, _Record] = {}
            for r in recs:
                if r.ns not in best or r.cid > best[r.ns].cid:
                    best[r.ns] = r
            return list(best.values())

        for thread_id in thread_ids:
            yield from self._rewrite(thread_id, newest)
        return None

    def _rewrite(self, thread_id: Any, keep_fn: Any) -> Plan[None]:
        """Keep the checkpoints `keep_fn(records)` returns, delete the others with their
        writes and every blob no kept checkpoint refers to; heads follow. Bounded Txns: heads
        first (a reader never finds a head whose checkpoint is gone), then the deletes."""
        sid = self.sid(thread_id)
        everything = (yield [Scan(sid, "")])[0]
        loads = self.serde.loads_typed
        recs: list[_Record] = []
        heads: dict[str, Record] = {}
        for r in everything:
            kind = r.key[:2]
            if kind == "c/":
                _, ens, ecid = r.key.split("/", 2)
                rec = _Record(dec(ens), dec(ecid), r.value)
                rec.metadata = loads(rec.md)
                recs.append(rec)
            elif kind == "h/":
                heads[dec(r.key[2:])] = r
        kept = keep_fn(recs)
        kept_ids = {(r.ns, r.cid) for r in kept}
        referenced: set[str] = set()
        newest: dict[str, _Record] = {}
        for r in kept:
            for k, v in loads(r.ckpt)["channel_versions"].items():
                referenced.add(_bkey(r.ns, k, v))
            if r.ns not in newest or r.cid > newest[r.ns].cid:
                newest[r.ns] = r
        head_writes = Writes(sid)
        for ns, h in heads.items():
            n = newest.get(ns)
            if n is None:
                head_writes.deletes.append(_hkey(ns))
            elif not h.value.startswith(n.cid.encode() + b"\0"):
                head_writes.puts.append((_hkey(ns), n.cid.encode() + b"\0" + n.raw))
        deletes = Writes(sid)
        parts: set[str] = set()  # the parts the values that stay refer to
        for r in everything:
            kind = r.key[:2]
            gone = False
            if kind == "c/":
                _, ens, ecid = r.key.split("/", 2)
                gone = (dec(ens), dec(ecid)) not in kept_ids
            elif kind == "w/":
                _, ens, ecid, _rest = r.key.split("/", 3)
                gone = (dec(ens), dec(ecid)) not in kept_ids
            elif kind == "b/":
                gone = r.key not in referenced
            if gone:
                deletes.deletes.append(r.key)
            elif kind in ("w/", "b/"):
                parts.update(_part_keys(r.key, r.value))
        deletes.deletes.extend(r.key for r in everything
                               if r.key.startswith("x/") and r.key not in parts)
        for chunk in head_writes.chunks():
            yield [chunk]
        for chunk in deletes.chunks():
            yield [chunk]
        self._forget(sid)

    def copy_thread(self, source: Any, target: Any) -> Plan[None]:
        src, dst = self.sid(source), self.sid(target)
        everything, dst_heads = yield [Scan(src, ""), Scan(dst, "h/")]
        if not everything:
            return None
        loads = self.serde.loads_typed
        copy = Writes(dst)
        runs: set[str] = set()
        for r in sorted(everything, key=lambda r: not r.key.startswith("x/")):  # parts first
            if r.key.startswith("h/"):
                continue
            copy.puts.append((r.key, r.value))
            if r.key.startswith("c/"):
                md = loads(tuple(ormsgpack.unpackb(r.value)[2:4]))
                if md.get("run_id"):
                    runs.add(str(md["run_id"]))
        have = {h.key: h.value for h in dst_heads}
        heads = Writes(dst)
        for r in everything:
            if r.key.startswith("h/"):
                old = have.get(r.key)
                if old is None or old.split(b"\0", 1)[0] < r.value.split(b"\0", 1)[0]:
                    heads.puts.append((r.key, r.value))
        index = [Commit(self.run_sid(run), _index_put(f"t/{enc(str(target))}")) for run in sorted(runs)]
        if index:
            yield index  # before the copies: a run's checkpoints are never out of its index
        for chunk in copy.chunks():
            yield [chunk]
        for chunk in heads.chunks():  # last: a head's checkpoint is always there
            yield [chunk]
        self._forget(dst)
        return None


def _index_put(key: str) -> Any:
    def build(txn: Any) -> Any:
        return txn.put(key, b"")
    return build


def _ours(version: Any) -> bool:
    """Whether a channel version has next_version's form (a random part: never reused)."""
    return isinstance(version, str) and len(version) > 40 and version[32] == "."


def next_version(current: str | int | float | None) -> str:
    """As InMemorySaver: a zero-padded counter with a random tie-break, increasing."""
    if current is None:
        n = 0
    elif isinstance(current, (int, float)):
        n = int(current)
    else:
        n = int(current.split(".")[0])
    return f"{n + 1:032}.{random.random():016}"
