"""How the LangGraph savers store threads, and the plan of every saver method (run by
langgraph_driver's sync or async driver).

Each thread is one shardstate session (`{prefix}t/{thread_id}`), so all of a thread is on one
shard and one `Txn` stores a checkpoint with its new channel blobs. Keys of a thread session
(`{ns}`, `{channel}`, `{task_id}` escaped by `enc`; `{rid}` is the checkpoint id in an
order-reversing encoding, so the newest checkpoint of a namespace sorts first):

    c/{ns}/{rid}                       the checkpoint (without channel values), its metadata,
                                       parent and id
    c/{ns}/{rid}/w/{task_id}/{idx}     one pending write of it; (task_id, idx) is its identity
    b/{ns}/{channel}/{version}         a channel's value at a version: stored once per version,
                                       whole, or (when it is the list of the version before
                                       with items appended) as a delta: the items added and
                                       the versions back to a whole one (at most MAX_CHAIN)
    x/{key}/{token}/{i}                a part of a large blob or write stored at `key` (which
                                       then holds only b"\xc1" + [token, parts]); the parts
                                       are committed before the Txn that refers to them

So one Scan of `c/{ns}/` with a small limit reads the newest checkpoint and its writes, and a
Scan of `c/{ns}/{rid}` one checkpoint and its writes. A run index session per run
(`{prefix}r/{run_id}`, keys `t/{thread_id}`) names the threads a run wrote to, for
`delete_for_runs`. The session TTL (`ttl=`) is sent with every write, so an idle thread
expires that long after its last write; `prune` and `delete_thread` free space before that.
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
_LIST_CHUNK = 64  # checkpoints whose blobs one step of list() reads
_LATEST_PAGE = 16  # items the first read of a namespace's newest checkpoint asks for, unknown
BLOB_CACHE_BYTES = 32 << 20  # channel values this process wrote, kept to skip reading them back
PART_BYTES = 256 << 10  # a value this large is stored in parts (the server's default limit
INLINE_BYTES = 2 << 20  # is 1 MiB a value, 4 MiB a request); and more go out of line
TXN_KEYS = 250  # keys one put or put_writes Txn writes at most (the server takes 1000 ops)
_PARTED = 0xC1  # the first byte of a parted value (never the start of a msgpack value)
_DELTA = 0x94  # the first byte of a delta blob: [type, header, appended, chain]; whole: 0x92
MAX_CHAIN = 16  # deltas in a row on one whole blob; the next version is stored whole
_FLIP = str.maketrans("0123456789abcdef", "fedcba9876543210")


def rid(cid: str) -> str:
    """A checkpoint id as a key segment that sorts in the reverse order: its UTF-8 bytes in
    hex, each digit complemented, then "g" (above every digit, so a longer id sorts first)."""
    return cid.encode().hex().translate(_FLIP) + "g"


def _ckey(ns: str, cid: str) -> str:
    return f"c/{enc(ns)}/{rid(cid)}"


def _bkey(ns: str, channel: str, version: Any) -> str:
    return f"b/{enc(ns)}/{enc(channel)}/{enc(str(version))}"


def _wkey(ns: str, cid: str, task_id: str, idx: int) -> str:
    return f"{_ckey(ns, cid)}/w/{enc(task_id)}/{idx}"


def _is_record(key: str) -> bool:
    return key.count("/") == 2


def _owner(key: str) -> str:
    """The checkpoint key a write's key belongs to (its first three segments)."""
    return "/".join(key.split("/", 3)[:3])


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


def _array_head(data: bytes) -> int:
    """The length of the msgpack array header `data` starts with (0: not an array)."""
    if not data:
        return 0
    b = data[0]
    return 1 if 0x90 <= b <= 0x9F else 3 if b == 0xDC else 5 if b == 0xDD else 0


def appended(prev: bytes, new: bytes) -> tuple[bytes, bytes] | None:
    """When `new` is the msgpack array `prev` with items appended (byte for byte): new's
    header and the bytes of the items it adds; else None."""
    hp, hn = _array_head(prev), _array_head(new)
    if not hp or not hn or len(new) - hn <= len(prev) - hp:
        return None
    if not new.startswith(memoryview(prev)[hp:], hn):
        return None
    return new[:hn], new[hn + len(prev) - hp:]


def _is_delta(value: bytes | None) -> bool:
    return bool(value) and value[0] == _DELTA  # type: ignore[index]


def _short(version: str) -> str:
    """One of next_version's versions without its counter's leading zeros (as a delta's
    chain stores it)."""
    return version[:32].lstrip("0") + version[32:]


def _chain_keys(key: str, chain: list[str]) -> list[str]:
    """The blob keys of a delta's chain (`_short` versions of the same channel as `key`)."""
    stem = key[:key.rindex("/") + 1]
    return [stem + enc(counter.zfill(32) + "." + rest)
            for counter, rest in (v.split(".", 1) for v in chain)]


def deletion_order(keys: list[str]) -> list[str]:
    """The order a thread's keys are deleted in, over Txns that land one by one: checkpoints
    and writes first (a reader never finds a checkpoint whose values are gone), then blobs,
    newest version first within each channel (so a version that is still there has its whole
    delta chain: what a put building on it checks), then parts."""
    def order(key: str) -> tuple[int, str, int]:
        if key.startswith("c/"):
            return (0, key, 0)
        if not key.startswith("b/"):
            return (2, key, 0)
        stem, version = key.rsplit("/", 1)
        counter = dec(version).split(".", 1)[0]  # next_version's counter, or an int version
        return (1, stem, -int(counter) if counter.isdigit() else 0)
    return sorted(keys, key=order)


def _undelta(key: str, record: bytes, values: dict[str, bytes | None]) -> bytes:
    """A delta blob made whole, from `values` (blob keys -> whole values, or the stored
    delta records of the chain's later versions); the newest chain version found whole is
    the starting point."""
    t, head, suffix, chain = ormsgpack.unpackb(record)
    keys = _chain_keys(key, chain)
    start = next((i for i in range(len(keys) - 1, -1, -1)
                  if (v := values.get(keys[i])) is not None and not _is_delta(v)), None)
    if start is None:
        raise ShardstateError(f"the base of {key!r} is missing: the thread's data is damaged")
    _, base = ormsgpack.unpackb(values[keys[start]])  # type: ignore[arg-type]
    pieces = [head, memoryview(base)[_array_head(base):]]
    for k in keys[start + 1:]:
        v = values.get(k)
        if v is None or not _is_delta(v):
            raise ShardstateError(f"{k!r} of the chain of {key!r} is missing: the thread's "
                                  "data is damaged")
        pieces.append(ormsgpack.unpackb(v)[2])
    pieces.append(suffix)
    return ormsgpack.packb([t, b"".join(pieces)])


def _part_keys(key: str, value: bytes) -> list[str]:
    """The keys of a parted value's parts ([] for a value stored whole)."""
    if not value or value[0] != _PARTED:
        return []
    token, n = ormsgpack.unpackb(value[1:])
    return [f"x/{key}/{token}/{j}" for j in range(n)]


def _read(sid: str, keys: list[str], fetched: dict[str, bytes | None]) -> Plan[list[bytes | None]]:
    """The stored values of `keys`: from `fetched` (what an earlier request already read),
    the others in one round trip."""
    unknown = [k for k in keys if k not in fetched]
    got = (yield [Get(sid, k) for k in unknown]) if unknown else []
    found = {k: (r.value if r is not None else None) for k, r in zip(unknown, got, strict=True)}
    return [fetched[k] if k in fetched else found[k] for k in keys]


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


class _Blob:
    """A channel value to store at a version: what is stored (`whole`, or a delta on
    `chain`)."""

    __slots__ = ("chain", "channel", "key", "stored", "version", "whole")

    def __init__(self, key: str, version: str, channel: str, stored: bytes, whole: bytes,
                 chain: list[str]) -> None:
        self.key, self.version, self.channel = key, version, channel
        self.stored, self.whole, self.chain = stored, whole, chain


class _Record:
    """A stored checkpoint: its id, namespace, parent and the serialized parts."""

    __slots__ = ("cid", "ckpt", "key", "md", "metadata", "ns", "parent", "raw")

    def __init__(self, key: str, raw: bytes) -> None:
        self.key, self.raw = key, raw
        self.ns = dec(key.split("/", 2)[1])
        ct, cb, mt, mb, self.parent, self.cid = ormsgpack.unpackb(raw)
        self.ckpt = (ct, cb)
        self.md = (mt, mb)
        self.metadata: Any = None


def _records(found: list[Record]) -> tuple[list[_Record], dict[str, list[Record]]]:
    """A scan of `c/...` split into checkpoints and the writes of each (by checkpoint key)."""
    recs: list[_Record] = []
    writes: dict[str, list[Record]] = {}
    for r in found:
        if _is_record(r.key):
            recs.append(_Record(r.key, r.value))
        else:
            writes.setdefault(_owner(r.key), []).append(r)
    return recs, writes


class SaverCore:
    """What both savers share: key layout, serialization, and the plans of every method."""

    def __init__(self, saver: BaseCheckpointSaver[Any], prefix: str) -> None:
        self.saver = saver
        self.prefix = prefix
        # the newest checkpoint this process wrote per (thread session, ns): its id, channel
        # versions and how many writes it has had, so a read of the latest asks for as many
        # items as it needs and fetches the blobs it lacks in the same round trip
        self.heads: dict[str, dict[str, list[Any]]] = {}
        self.indexed: set[tuple[Any, Any]] = set()  # (run_id, thread_id) already in the run index
        # blobs this process wrote, by (thread session, blob key): a blob is never rewritten
        # with another value under the same key, except after the thread was deleted and
        # written again with the same versions, so only versions this saver made (a counter
        # and a random part, see next_version) are kept, and a deleted thread's are dropped
        self.blobs: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.blob_bytes = 0
        # the newest blob this process wrote per (thread session, ns, channel): its version
        # and its delta chain ([] when whole), the base of the next version's delta
        self.last: dict[tuple[str, str, str], tuple[str, list[str]]] = {}
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
                by_ns[ns] = [cid, dict(versions), 0]

    def _count_writes(self, sid: str, ns: str, cid: str, n: int) -> None:
        with self.lock:
            head = self.heads.get(sid, {}).get(ns)
            if head is not None and head[0] == cid:
                head[2] += n

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

    def _forget(self, sid: str) -> None:
        """Drop what this process remembers of a thread it deleted or rewrote."""
        with self.lock:
            self.heads.pop(sid, None)
            for last in [k for k in self.last if k[0] == sid]:
                del self.last[last]
            for blob in [k for k in self.blobs if k[0] == sid]:
                self.blob_bytes -= len(self.blobs.pop(blob))

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
        blobs: list[_Blob] = []
        for k, v in new_versions.items():
            if k in values:
                t, data = dumps(values[k])
                blobs.append(self._blob(sid, ns, k, v, t, data))
        md = get_checkpoint_metadata(config, metadata)
        ct, cb = dumps(c)
        mt, mb = dumps(md)
        raw = ormsgpack.packb([ct, cb, mt, mb, conf.get("checkpoint_id"), cid])
        run_id = md.get("run_id")
        indexed = not run_id or (run_id, thread_id) in self.indexed
        while True:
            stored, parts = _outline(sid, [(b.key, b.stored) for b in blobs])
            if len(stored) > TXN_KEYS:  # the blobs past a Txn's worth go first, on their own
                parts.extend(Writes(sid, puts=stored[TXN_KEYS:]).chunks())
                stored = stored[:TXN_KEYS]
            for part in parts:
                yield [part]
            stored.append((_ckey(ns, cid), raw))  # the checkpoint with its blobs: one Txn
            # a delta's chain must still be there (prune or delete may have taken it since):
            # blobs are deleted newest first (deletion_order), so while the version a delta
            # builds on exists, so does the rest of its chain
            bases = sorted({_chain_keys(b.key, b.chain[-1:])[0] for b in blobs if b.chain})
            reqs: list[Request] = [Commit(sid, _puts(stored, bases))]
            if not indexed:
                reqs.append(Commit(self.run_sid(str(run_id)),
                                   _puts([(f"t/{enc(str(thread_id))}", b"")])))
            res, *_ = yield reqs
            if not indexed:
                indexed = True
                with self.lock:
                    if len(self.indexed) >= 100_000:
                        self.indexed.clear()
                    self.indexed.add((run_id, thread_id))
            if res.succeeded:
                break
            self._forget(sid)  # what it remembered of the thread is out of date: all whole
            blobs = [_Blob(b.key, b.version, b.channel, b.whole, b.whole, []) for b in blobs]
        self._remember_head(sid, ns, cid, checkpoint["channel_versions"])
        for b in blobs:
            if _ours(b.version):
                self._remember_blob(sid, b.key, b.whole)
                with self.lock:
                    if len(self.last) >= 100_000:
                        self.last.clear()
                    self.last[(sid, ns, b.channel)] = (b.version, b.chain)
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_id": cid}}

    def _blob(self, sid: str, ns: str, channel: str, version: Any, t: str, data: bytes) -> _Blob:
        """A channel's value to store: as a delta on the version this process wrote before
        it when its list only grew (and the chain is short enough), else whole."""
        key = _bkey(ns, channel, version)
        whole = ormsgpack.packb([t, data])
        if _ours(version):
            with self.lock:
                last = self.last.get((sid, ns, channel))
            if last is not None and len(last[1]) < MAX_CHAIN:
                prev_version, prev_chain = last
                prev = self._cached_blob(sid, _bkey(ns, channel, prev_version))
                if prev is not None:
                    prev_t, prev_data = ormsgpack.unpackb(prev)
                    added = appended(prev_data, data) if prev_t == t else None
                    if added is not None and 2 * len(added[1]) < len(data):
                        chain = [*prev_chain, _short(prev_version)]
                        delta = ormsgpack.packb([t, added[0], added[1], chain])
                        return _Blob(key, version, channel, delta, whole, chain)
        return _Blob(key, str(version), channel, whole, whole, [])

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
        self._count_writes(sid, ns, cid, len(regular) + len(special))
        return None

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
            (found,) = yield [Scan(sid, _ckey(ns, cid))]  # the checkpoint, then its writes
            if not found or not _is_record(found[0].key):
                return None
            rec, writes = _Record(found[0].key, found[0].value), found[1:]
            checkpoint = self.serde.loads_typed(rec.ckpt)
            blobs = yield from self._blobs(sid, ns, checkpoint["channel_versions"], {})
        else:
            rec, writes, checkpoint, blobs = yield from self._latest(sid, ns)
            if rec is None:
                return None
        values = yield from self._writes(sid, writes)
        return self._tuple(thread_id, rec, checkpoint, values, blobs)

    def _latest(self, sid: str, ns: str) -> Plan[Any]:
        """The newest checkpoint of a namespace, its writes, the checkpoint decoded and its
        blobs: one Scan from the top of `c/{ns}/` (asking for the checkpoint, as many writes
        as this process knows of and one item more, so it can tell the writes ended), plus,
        when this process wrote that checkpoint, the blobs it lacks in the same round trip."""
        prefix = f"c/{enc(ns)}/"
        guess = self.heads.get(sid, {}).get(ns)
        page = guess[2] + 2 if guess is not None else _LATEST_PAGE
        reqs: list[Request] = [Scan(sid, prefix, limit=page)]
        fetch: list[str] = []
        if guess is not None:
            for k, v in guess[1].items():
                key = _bkey(ns, k, v)
                if key not in fetch and self._cached_blob(sid, key) is None:
                    fetch.append(key)
            reqs.extend(Get(sid, k) for k in fetch)
        items, *rest = yield reqs
        exhausted = len(items) < page
        head: Record | None = None
        writes: list[Record] = []
        i = 0
        while True:
            done = False
            while i < len(items) and not done:
                it = items[i]
                i += 1
                if head is None:
                    if _is_record(it.key):
                        head = it
                    # else: a write of a checkpoint not stored (yet): not the newest one
                elif it.key.startswith(head.key + "/"):
                    writes.append(it)
                else:
                    done = True
            if done or exhausted:
                break
            more = (yield [Scan(sid, prefix, limit=64, start_after=items[-1].key)])[0]
            exhausted = len(more) < 64
            items = more
            i = 0
        if head is None:
            return None, [], None, {}
        rec = _Record(head.key, head.value)
        checkpoint = self.serde.loads_typed(rec.ckpt)
        fetched: dict[str, bytes | None] = {}
        if guess is not None and guess[0] == rec.cid:
            fetched = {k: (r.value if r is not None else None)
                       for k, r in zip(fetch, rest, strict=True)}
        blobs = yield from self._blobs(sid, ns, checkpoint["channel_versions"], fetched)
        return rec, writes, checkpoint, blobs

    @staticmethod
    def _writes(sid: str, recs: list[Record]) -> Plan[list[bytes]]:
        values = yield from _inflate(sid, [(r.key, r.value) for r in recs])
        return [v for v in values if v is not None]

    def _blobs(self, sid: str, ns: str, versions: dict[str, Any],
               fetched: dict[str, bytes | None]) -> Plan[dict[str, bytes | None]]:
        """Each channel's stored blob at its version: from `fetched`, the cache, or a read."""
        keys = {k: _bkey(ns, k, v) for k, v in versions.items()}
        out: dict[str, bytes | None] = {}
        for k, key in keys.items():
            if key not in fetched and (data := self._cached_blob(sid, key)) is not None:
                out[k] = data
        rest = [k for k in keys if k not in out]
        out.update(zip(rest, (yield from _read(sid, [keys[k] for k in rest], fetched)), strict=True))
        names = list(keys)
        whole = dict(zip(names, (yield from _inflate(sid, [(keys[k], out[k]) for k in names])),
                         strict=True))
        deltas = [k for k in names if _is_delta(whole[k])]
        if not deltas:
            return whole
        # a delta's chain: the newest version this process has whole, and the deltas after it
        have: dict[str, bytes | None] = {}
        need: list[str] = []
        for k in deltas:
            chain = _chain_keys(keys[k], ormsgpack.unpackb(whole[k])[3])  # type: ignore[arg-type]
            for i in range(len(chain) - 1, -1, -1):
                if chain[i] in have:
                    break
                if (data := self._cached_blob(sid, chain[i])) is not None:
                    have[chain[i]] = data
                    break
                if chain[i] not in need:
                    need.append(chain[i])
        stored = yield from _read(sid, need, fetched)
        have.update(zip(need, (yield from _inflate(sid, list(zip(need, stored, strict=True)))),
                        strict=True))
        for k in deltas:
            whole[k] = _undelta(keys[k], whole[k], have)  # type: ignore[arg-type]
        return whole

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
        if want_cid and ns_filter is not None:
            prefix = _ckey(ns_filter, want_cid)
        else:
            prefix = f"c/{enc(ns_filter)}/" if ns_filter is not None else "c/"
        (found,) = yield [Scan(sid, prefix)]
        recs, writes = _records(found)
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
            keys = sorted({_bkey(r.ns, k, v) for r, c in zip(part, ckpts, strict=True)
                           for k, v in c["channel_versions"].items()})
            keys = [k for k in keys if self._cached_blob(sid, k) is None]
            got = (yield [Get(sid, k) for k in keys]) if keys else []
            fetched = {k: (r.value if r is not None else None) for k, r in zip(keys, got, strict=True)}
            for r, c in zip(part, ckpts, strict=True):
                blobs = yield from self._blobs(sid, r.ns, c["channel_versions"], fetched)
                values = yield from self._writes(sid, writes.get(r.key, []))
                out.append(self._tuple(thread_id, r, c, values, blobs))
        return out

    # ---- deletion, copy, prune ----

    def delete_thread(self, thread_id: Any) -> Plan[None]:
        yield [Drop(self.sid(thread_id))]
        self._forget(self.sid(thread_id))

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
        with self.lock:
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
        writes, every blob no kept checkpoint refers to and every part no kept value refers
        to, in Txns of bounded size."""
        sid = self.sid(thread_id)
        everything = (yield [Scan(sid, "")])[0]
        loads = self.serde.loads_typed
        recs, _ = _records([r for r in everything if r.key.startswith("c/")])
        for rec in recs:
            rec.metadata = loads(rec.md)
        kept = {r.key: r for r in keep_fn(recs)}
        referenced: set[str] = set()
        for r in kept.values():
            for k, v in loads(r.ckpt)["channel_versions"].items():
                referenced.add(_bkey(r.ns, k, v))
        stored = {r.key: r.value for r in everything}
        for r in everything:  # and the chains of the deltas among them
            if r.key in referenced and r.value:
                value = b"".join(stored.get(k) or b"" for k in _part_keys(r.key, r.value)) or r.value
                if _is_delta(value):
                    referenced.update(_chain_keys(r.key, ormsgpack.unpackb(value)[3]))
        gone: list[str] = []
        parts: set[str] = set()  # the parts the values that stay refer to
        for r in everything:
            kind = r.key[:2]
            if kind == "c/":
                drop = (r.key if _is_record(r.key) else _owner(r.key)) not in kept
            elif kind == "b/":
                drop = r.key not in referenced
            else:
                continue
            if drop:
                gone.append(r.key)
            else:
                parts.update(_part_keys(r.key, r.value))
        gone.extend(r.key for r in everything if r.key.startswith("x/") and r.key not in parts)
        deletes = Writes(sid, deletes=deletion_order(gone))
        for chunk in deletes.chunks():
            yield [chunk]
        self._forget(sid)

    def copy_thread(self, source: Any, target: Any) -> Plan[None]:
        src, dst = self.sid(source), self.sid(target)
        (everything,) = yield [Scan(src, "")]
        if not everything:
            return None
        loads = self.serde.loads_typed
        runs: set[str] = set()
        for r in everything:
            if r.key.startswith("c/") and _is_record(r.key):
                md = loads(tuple(ormsgpack.unpackb(r.value)[2:4]))
                if md.get("run_id"):
                    runs.add(str(md["run_id"]))
        index = [Commit(self.run_sid(run), _puts([(f"t/{enc(str(target))}", b"")]))
                 for run in sorted(runs)]
        if index:
            yield index  # before the copies: a run's checkpoints are never out of its index
        # parts first, then blobs, then checkpoints with their writes: a reader of the target
        # never finds a checkpoint whose values are not there yet
        order = {"x/": 0, "b/": 1, "c/": 2}
        copy = Writes(dst, puts=[(r.key, r.value) for r in
                                 sorted(everything, key=lambda r: (order.get(r.key[:2], 3), r.key))])
        for chunk in copy.chunks():
            yield [chunk]
        self._forget(dst)
        return None


def _puts(items: list[tuple[str, bytes]], present: Sequence[str] = ()) -> Any:
    """A Txn's build: put every item, if every key of `present` exists."""
    def build(txn: Any) -> Any:
        for k in present:
            txn.if_exists(k)
        for k, v in items:
            txn.put(k, v)
        return txn
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
