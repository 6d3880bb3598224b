"""Pure logic of the router: page tokens and the ListSessions merge, batch split/reassemble,
map adoption by epoch, the bootstrap map, and the partial wire views."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstate.common import errors
from shardstate.router import batching, listing, maps, pipeline, shardlink, wire
from shardstate.router.nodes import NodePool
from shardstate.v1 import admin_pb2, state_pb2, types_pb2

# ---- page tokens and merge ----


def test_page_token_round_trips() -> None:
    c = listing.Cursor("agent-\x00-é", {"s2", "s1"})
    tok = listing.encode_token(c)
    assert tok.isascii() and "=" not in tok
    assert listing.decode_token(tok) == c
    assert listing.decode_token("") == listing.Cursor()


@pytest.mark.parametrize("bad", ["!!", "e30", "eyJ2IjoyLCJhZnRlciI6IiIsImRvbmUiOltdfQ", "bm90IGpzb24"])
def test_bad_page_tokens_are_invalid_argument(bad: str) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="page_token"):
        listing.decode_token(bad)


def simulate(shards: dict[str, list[str]], limit: int) -> list[list[str]]:
    """Page through fake shards that behave like a shard's ListSessions (after, limit)."""
    pages: list[list[str]] = []
    cursor = listing.Cursor()
    while True:
        got = {}
        for sid, ids in shards.items():
            if sid in cursor.done:
                continue
            rest = sorted(i for i in ids if i > cursor.after)
            got[sid] = listing.ShardPage(
                [types_pb2.SessionInfo(session_id=i, shard_id=sid) for i in rest[:limit]], len(rest) > limit
            )
        out, nxt = listing.merge(got, cursor, limit, list(shards))
        pages.append([s.session_id for s in out])
        if nxt is None:
            return pages
        assert nxt.after > cursor.after
        cursor = listing.decode_token(listing.encode_token(nxt))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(string.ascii_lowercase + "é\x00", min_size=1, max_size=6), unique=True, max_size=80),
    st.integers(1, 4),
    st.integers(1, 12),
    st.randoms(use_true_random=False),
)
def test_merge_pages_every_session_once_sorted(ids: list[str], n: int, limit: int, rnd: random.Random) -> None:
    shards: dict[str, list[str]] = {f"s{i}": [] for i in range(n)}
    for i in ids:
        shards[f"s{rnd.randrange(n)}"].append(i)
    pages = simulate(shards, limit)
    flat = [i for p in pages for i in p]
    assert flat == sorted(ids)
    assert all(len(p) == limit for p in pages[:-1]) or not ids
    assert len(pages[-1]) <= limit


def test_merge_dedupes_a_session_on_two_shards_preferring_the_owner() -> None:
    a = types_pb2.SessionInfo(session_id="x", shard_id="s1", key_count=1)
    b = types_pb2.SessionInfo(session_id="x", shard_id="s2", key_count=2)
    pages = {"s1": listing.ShardPage([a], False), "s2": listing.ShardPage([b], False)}
    out, nxt = listing.merge(pages, listing.Cursor(), 10, ["s1", "s2"], owner=lambda sid: "s2")
    assert [s.shard_id for s in out] == ["s2"] and nxt is None


def test_merge_skips_done_shards_and_asks_new_ones() -> None:
    # s3 joined the map after the first page: it is not in `done`, so it is asked.
    cursor = listing.Cursor("m", {"s1"})
    pages = {"s2": listing.ShardPage([types_pb2.SessionInfo(session_id="n")], False),
             "s3": listing.ShardPage([types_pb2.SessionInfo(session_id="o")], True)}
    out, nxt = listing.merge(pages, cursor, 5, ["s1", "s2", "s3"])
    assert [s.session_id for s in out] == ["n", "o"]
    assert nxt == listing.Cursor("o", {"s1", "s2"})


def test_merge_stops_at_a_shard_whose_page_was_shorter_than_the_callers() -> None:
    # s1 serves pages of 2 at most (its --max-page): its page ends at "c" with more after.
    # Everything up to "c" is known from every shard; past it, s1 was not heard yet.
    info = types_pb2.SessionInfo
    pages = {"s1": listing.ShardPage([info(session_id="a"), info(session_id="c")], True),
             "s2": listing.ShardPage([info(session_id=i) for i in ("b", "d", "e")], False)}
    out, nxt = listing.merge(pages, listing.Cursor(), 4, ["s1", "s2"])
    assert [s.session_id for s in out] == ["a", "b", "c"]
    assert nxt == listing.Cursor("c", set())


# ---- batch split / reassemble ----


def test_split_groups_in_request_order_and_keeps_empty_ops_apart() -> None:
    sessions = [("default", "a"), None, ("default", "b"), ("default", "c"), ("ns", "a")]
    groups, empty = batching.split(sessions, range(5), lambda ns, sid: "s1" if sid == "a" else "s2")
    assert groups == {"s1": [0, 4], "s2": [2, 3]}
    assert empty == [1]


def result(code: int = 0, **kw: object) -> bytes:
    return bytes(state_pb2.BatchResult(code=code, **kw).SerializeToString())  # type: ignore[arg-type]


def test_place_puts_results_at_their_index_and_returns_redirected_ones() -> None:
    out: list[bytes | None] = [None] * 5
    ok = result(get=state_pb2.GetResponse(found=True))
    moved = result(9, message="no", wrong_shard=types_pb2.WrongShard(epoch=2, owner="s3"))
    replica = result(9, message="no", not_primary=types_pb2.NotPrimary(primary="x"))
    plain_fp = result(9, message="other precondition")
    retry = batching.place(out, [4, 1, 3], [ok, moved, plain_fp])
    assert retry == [1]
    assert out == [None, None, None, plain_fp, ok]
    assert batching.place(out, [0, 1, 2], [ok, replica, ok]) == [1]
    with pytest.raises(errors.InternalError):
        batching.assemble(b"", out)
    out[1] = ok
    resp = state_pb2.BatchResponse.FromString(
        batching.assemble(types_pb2.ResponseHeader(shard_id="s1").SerializeToString(), out)
    )
    assert resp.header.shard_id == "s1" and len(resp.results) == 5
    assert resp.results[3].message == "other precondition"


def test_batch_of_ops_stays_bytes_and_routes_by_each_op_session() -> None:
    ops = [
        state_pb2.BatchOp(put=state_pb2.PutRequest(namespace="n", session_id="p", key="k", value=b"\x00" * 10)),
        state_pb2.BatchOp(txn=state_pb2.TxnRequest(session_id="t")),
        state_pb2.BatchOp(get_session=state_pb2.GetSessionRequest(namespace="m", session_id="g")),
        state_pb2.BatchOp(),
    ]
    raw = state_pb2.BatchRequest(ops=ops).SerializeToString()
    parsed = list(wire.RawBatch.FromString(raw).ops)
    assert [wire.op_session(o) for o in parsed] == [("n", "p"), ("default", "t"), ("m", "g"), None]
    # Sub-batches are re-framed from the same bytes.
    sub = wire.RawBatch(ops=parsed[:2]).SerializeToString()
    assert list(state_pb2.BatchRequest.FromString(sub).ops) == ops[:2]


def test_session_of_and_redirect_of() -> None:
    req = state_pb2.AppendRequest(session_id="s", stream="m", entries=[b"\xff"] * 3).SerializeToString()
    assert wire.session_of(req) == ("default", "s")
    assert wire.redirect_of(result(get=state_pb2.GetResponse())) is None
    assert wire.redirect_of(result(3, message="bad")) is None
    ws = wire.redirect_of(result(9, wrong_shard=types_pb2.WrongShard(epoch=7, owner="s2")))
    assert isinstance(ws, types_pb2.WrongShard) and ws.epoch == 7


def test_watch_position_is_the_highest_revision_shown() -> None:
    resp = state_pb2.WatchResponse(events=[types_pb2.Event(revision=5), types_pb2.Event(revision=9)], progress_revision=7)
    assert wire.watch_position(resp.SerializeToString()) == 9
    assert wire.watch_position(state_pb2.WatchResponse(progress_revision=11).SerializeToString()) == 11


def test_op_session_takes_the_last_op_field_like_the_oneof() -> None:
    put = state_pb2.BatchOp(put=state_pb2.PutRequest(session_id="a")).SerializeToString()
    get = state_pb2.BatchOp(get=state_pb2.GetRequest(namespace="n", session_id="b")).SerializeToString()
    assert state_pb2.BatchOp.FromString(put + get).WhichOneof("op") == "get"
    assert wire.op_session(put + get) == ("n", "b")
    assert wire.op_session(b"") is None


@pytest.mark.parametrize("sizes", [[], [0], [1, 127, 128, 16383, 16384, 70000], [1079] * 11])
def test_shard_pipeline_request_framing_matches_protobuf(sizes: list[int]) -> None:
    ops = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    for rid in (1, 127, 128, 2**40):
        got = wire.RawPipelineRequest.FromString(shardlink.pipeline_request(rid, ops))
        assert got.id == rid and list(got.batch.ops) == ops
        assert shardlink.pipeline_request(rid, ops) == wire.RawPipelineRequest(
            id=rid, batch=wire.RawBatch(ops=ops)).SerializeToString()


def test_pipeline_response_framing_matches_protobuf() -> None:
    body = state_pb2.BatchResponse(results=[state_pb2.BatchResult(code=3, message="x")]).SerializeToString()
    for rid in (0, 1, 300, 2**63):
        got = state_pb2.PipelineResponse.FromString(pipeline.response_bytes(rid, body))
        assert got.id == rid and got.batch.results[0].message == "x"


# ---- the map ----


def cmap(epoch: int, *ids: str) -> admin_pb2.ClusterMap:
    pb = admin_pb2.ClusterMap(epoch=epoch)
    for i, sid in enumerate(ids):
        pb.shards.add(id=sid, primary=f"127.0.0.1:{7401 + i}", weight=1, state=admin_pb2.ACTIVE)
    return pb


def test_map_adoption_only_by_higher_epoch() -> None:
    h = maps.MapHolder(NodePool(), ["127.0.0.1:1"])
    assert h.view.epoch == 0
    assert h.adopt(cmap(2, "s1", "s2"))
    assert not h.adopt(cmap(2, "s1", "s2", "s3"))  # same epoch: kept
    assert not h.adopt(cmap(1, "s9"))
    assert not h.adopt(cmap(5))  # no shards: never adopted
    assert [s.id for s in h.view.pb.shards] == ["s1", "s2"]
    assert h.adopt(cmap(3, "s1", "s2", "s3"))
    assert h.view.epoch == 3 and h.view.owner("default", "x").id in {"s1", "s2", "s3"}
    assert h.addresses() == ["127.0.0.1:7401", "127.0.0.1:7402", "127.0.0.1:7403", "127.0.0.1:1"]


def test_highest_prefers_the_first_of_equal_epochs() -> None:
    a, b, c = cmap(2, "a"), cmap(2, "b"), cmap(1, "c")
    assert maps.highest([c, None, a, b]) is a
    assert maps.highest([]) is None


def test_bootstrap_map_from_seed_statuses() -> None:
    def status(addr: str, sid: str, role: int) -> tuple[str, admin_pb2.StatusResponse]:
        return addr, admin_pb2.StatusResponse(nodes=[admin_pb2.NodeStatus(address=addr, shard_id=sid, role=role)])  # type: ignore[arg-type]

    pb = maps.bootstrap_map([
        status("h:3", "s2", admin_pb2.PRIMARY),
        status("h:1", "s1", admin_pb2.PRIMARY),
        status("h:4", "s1", admin_pb2.REPLICA),
        status("h:9", "", admin_pb2.ROUTER),
    ], cluster_id="c")
    assert pb.epoch == 1 and pb.cluster_id == "c"
    assert [(s.id, s.primary, list(s.replicas), s.weight, s.state) for s in pb.shards] == [
        ("s1", "h:1", ["h:4"], 1, admin_pb2.ACTIVE),
        ("s2", "h:3", [], 1, admin_pb2.ACTIVE),
    ]


def test_validate_map_explains_what_is_wrong() -> None:
    maps.validate_map(cmap(1, "s1"))
    for pb, word in [(cmap(0, "s1"), "epoch"), (cmap(1, "s1", "s1"), "twice"), (cmap(1), "no shard")]:
        with pytest.raises(errors.InvalidArgumentError, match=word):
            maps.validate_map(pb)
    pb = cmap(1, "s1")
    pb.shards[0].primary = ""
    with pytest.raises(errors.InvalidArgumentError, match="primary"):
        maps.validate_map(pb)


# ---- bad input at the edge (issue 13) ----

BAD_SID_PUT = b"\x12\x02\xff\xfe\x1a\x01k"  # PutRequest{session_id=<not UTF-8>, key="k"}


def test_names_that_are_not_utf8_are_refused_at_the_edge_naming_the_field() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="session_id is not valid UTF-8"):
        wire.session_of(BAD_SID_PUT)
    with pytest.raises(errors.InvalidArgumentError, match="namespace is not valid UTF-8"):
        wire.session_of(b"\x0a\x01\x80")
    op = b"\x12" + bytes([len(BAD_SID_PUT)]) + BAD_SID_PUT
    with pytest.raises(errors.InvalidArgumentError, match=r"ops\[4\]\.put: session_id is not valid UTF-8"):
        wire.op_session(op, 4)
    with pytest.raises(errors.InvalidArgumentError, match=r"ops\[2\] is not a valid shardstate.v1.BatchOp"):
        wire.op_session(b"\x12\x09a", 2)


def test_bad_ops_get_their_own_result_and_are_not_sent() -> None:
    good = state_pb2.BatchOp(get=state_pb2.GetRequest(session_id="g")).SerializeToString()
    ops = [good, b"\x12\x09a", b"\x12" + bytes([len(BAD_SID_PUT)]) + BAD_SID_PUT, b""]
    results: list[bytes | None] = [None] * len(ops)
    sessions, bad = batching.sessions_of(ops, results)
    assert sessions == [("default", "g"), None, None, None] and bad == {1, 2}
    assert results[0] is None and results[3] is None  # ops[3] (no op set) is split() 's to answer
    for i in (1, 2):
        r = state_pb2.BatchResult.FromString(results[i])  # type: ignore[arg-type]
        assert r.code == 3 and f"ops[{i}]" in r.message


def test_a_malformed_pipeline_message_is_answered_under_its_id() -> None:
    for raw, rid in [(b"\x08\x2a\x12\x40ab", 42), (b"\xff\xff\xff", 0), (b"\x08\x05\x08\x07\x12\x05", 7)]:
        resp = state_pb2.PipelineResponse.FromString(pipeline.malformed(raw, ValueError("x")))
        assert (resp.id, resp.code) == (rid, 3) and "PipelineRequest" in resp.message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.text(max_size=20), st.integers(0, 2**64 - 1), st.lists(st.binary(max_size=30), max_size=4))
def test_read_fields_takes_a_message_apart_as_encoded(value: bytes, key: str, version: int, entries: list[bytes]) -> None:
    from shardstate.common.protowire import WireError, last_varint, read_fields

    put = state_pb2.PutRequest(session_id="s", key=key, value=value, expected_version=version).SerializeToString()
    fields = read_fields(put)
    assert dict(fields)[2] == b"s" and dict(fields)[5] == version and dict(fields).get(4, b"") == value
    app = state_pb2.AppendRequest(session_id="s", entries=entries).SerializeToString()
    assert [v for n, v in read_fields(app) if n == 4] == entries
    assert last_varint(put, 5) == version
    with pytest.raises(WireError):
        read_fields(put + b"\x80")  # a tag that never ends
    with pytest.raises(WireError):
        read_fields(put + b"\x22\x05ab")  # field 4 claims 5 bytes, has 2


def test_shard_takes_a_batch_that_does_not_parse_apart_op_by_op() -> None:
    from shardstate.server.handlers import split_batch

    good = state_pb2.BatchOp(put=state_pb2.PutRequest(session_id="g", key="k")).SerializeToString()
    bad_sid = b"\x12" + bytes([len(BAD_SID_PUT)]) + BAD_SID_PUT
    raw = b"".join(b"\x0a" + bytes([len(o)]) + o for o in (good, bad_sid, b"\x12\x09a", good))
    part = split_batch(raw)
    assert len(part.batch.ops) == 4 and sorted(part.bad) == [1, 2]
    assert part.batch.ops[0].put.session_id == "g" and part.batch.ops[3].put.key == "k"
    assert "ops[1].put: session_id is not valid UTF-8" in part.bad[1].message
    assert "ops[2]" in part.bad[2].message
