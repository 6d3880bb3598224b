"""The CAS write of the one-shard benchmarks (benchmarks/shard_bench.py, benchmarks/write_path.py):
a Put of a session's "state" key from the version last seen, and that version kept current
from each answer."""

from __future__ import annotations

from shardstate import codec
from shardstate.v1 import state_pb2


def cas_request(sid: str, value: bytes, expected: int, rid: bool) -> state_pb2.PutRequest:
    req = state_pb2.PutRequest(session_id=sid, key="state", value=value, expected_version=expected)
    if rid:
        req.request_id = codec.new_request_id()  # the client library's ids
    return req


def note_cas(versions: dict[str, int], sid: str, r: state_pb2.PutResponse) -> bool:
    """Remember the session's version after a CAS; True when it was a conflict."""
    versions[sid] = r.version if r.applied else r.current.version
    return not r.applied
