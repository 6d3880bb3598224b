"""The history of primary terms behind a shard's data (`Timeline` in node meta `_|timeline`),
and the check a follower runs against its leader's history to find writes it must set aside.

A promotion appends a term starting at the promoted replica's applied revision F: every entry
above F in an older term's data was never received by the new primary (like PostgreSQL's
timeline history files).
"""

from __future__ import annotations

import uuid

from shardstate.v1 import replication_pb2

from ..storage.engine import Engine

META = "timeline"


def load(engine: Engine) -> replication_pb2.Timeline:
    raw = engine.node_meta(META)
    return replication_pb2.Timeline.FromString(raw) if raw else replication_pb2.Timeline()


def save(engine: Engine, tl: replication_pb2.Timeline) -> None:
    engine.set_node_meta(META, tl.SerializeToString())


def tail(tl: replication_pb2.Timeline) -> str:
    return tl.terms[-1].id if tl.terms else ""


def new_term(tl: replication_pb2.Timeline, epoch: int, start_revision: int) -> replication_pb2.Timeline:
    """`tl` plus a new term whose entries start above `start_revision`."""
    out = replication_pb2.Timeline()
    out.CopyFrom(tl)
    out.terms.add(id=f"e{epoch}-{uuid.uuid4().hex[:12]}", start_revision=start_revision)
    return out


def fork_point(leader: replication_pb2.Timeline, term: str, applied: int) -> int | None:
    """None when a follower whose data (up to `applied`) belongs to `term` holds a prefix of the
    leader's history. Otherwise the revision after which its entries are not the leader's
    (0 when the leader never heard of the term: none of its entries can be trusted)."""
    if not term or applied == 0:
        return None
    ids = [t.id for t in leader.terms]
    if term not in ids:
        return 0
    i = ids.index(term)
    if i == len(ids) - 1:
        return None
    end = int(leader.terms[i + 1].start_revision)
    return end if applied > end else None
