"""A shard writes a run of Batch ops on distinct sessions as one LevelDB WriteBatch: later ops of
the same batch still see earlier ones, every op keeps its own revision, answers name a
revision that includes them, and everything is there after the batch (and a kill -9)."""

from __future__ import annotations

from tests.stubs import Conn, shard_fixture, state_pb2, uid

shard = shard_fixture("s1")
T = 30.0


def _put(sid: str, key: str, value: bytes, **kw: object) -> state_pb2.BatchOp:
    return state_pb2.BatchOp(put=state_pb2.PutRequest(session_id=sid, key=key, value=value, **kw))  # type: ignore[arg-type]


def test_same_session_ops_in_one_batch_see_each_other(shard: Conn) -> None:
    a, b, c = uid(), uid(), uid()
    ops = [
        _put(a, "k", b"1", expected_version=0),
        _put(b, "k", b"1"),
        _put(a, "k", b"2", expected_version=0),  # create-only again: must see the first put
        _put(c, "k", b"x", request_id="r1"),
        _put(b, "j", b"2"),
        _put(c, "k", b"x", request_id="r1"),  # a retry inside the batch: replayed, not applied twice
        state_pb2.BatchOp(get=state_pb2.GetRequest(session_id=a, key="k")),
    ]
    r = list(shard.state.Batch(state_pb2.BatchRequest(ops=ops), timeout=T).results)
    assert [x.code for x in r] == [0] * len(ops)
    assert r[0].put.applied and r[1].put.applied
    assert not r[2].put.applied and r[2].put.current.version == r[0].put.version
    assert r[3].put.applied and r[5].put.header.replayed and r[5].put.version == r[3].put.version
    assert r[6].get.found and r[6].get.record.value == b"1"
    versions = [r[i].put.version for i in (0, 1, 3, 4)]
    assert versions == sorted(versions) and len(set(versions)) == 4
    for x in r:
        kind = x.WhichOneof("result")
        assert kind is not None
        body = getattr(x, kind)
        if kind == "put" and body.applied:
            assert body.header.revision >= body.version
    assert shard.get(c, "k").record.value == b"x"
    assert shard.get(b, "j").record.version == r[4].put.version
