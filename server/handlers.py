"""The shard's State and Admin services on a grpc.aio server (shardstate.common.grpcserve), with
the shard's own deserializers for Batch and Pipeline requests.

A Batch or Pipeline message carries many callers' ops (a router coalesces them): when it does
not parse whole, it is taken apart op by op (`Partial`), so each bad op fails alone and the
good ones run. A Pipeline message that cannot be taken apart fails only its own id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from shardstate.common import errors, grpcserve
from shardstate.common.auth import OP_ROLE, Gate
from shardstate.common.grpcserve import Malformed, diagnose
from shardstate.common.protowire import WireError, read_fields
from shardstate.v1 import state_pb2

__all__ = ["Malformed", "Partial", "authorized", "register", "split_batch"]


class Partial:
    """A BatchRequest (or the batch of a PipelineRequest `id`) some of whose ops do not parse:
    `batch` holds every op (an empty BatchOp in place of a bad one), `bad` each bad op's error
    (also the ops `authorized` refuses)."""

    __slots__ = ("bad", "batch", "id")

    def __init__(self, batch: state_pb2.BatchRequest, bad: dict[int, errors.ShardstateError], id: int = 0) -> None:
        self.batch = batch
        self.bad = bad
        self.id = id


def authorized(gate: Gate, req: Any) -> Any:
    """A BatchRequest, Partial or PipelineRequest with each op the caller may not run (its
    namespace or role not granted, or over its namespace's ops/s) set aside as a bad op of a
    `Partial`: it fails alone and the others run (docs/design.md §15). The cluster token (a
    router's coalesced ops, checked at the router) passes as it is."""
    if gate.cluster:
        return req
    rid = 0
    if type(req) is Partial:
        batch, bad, rid = req.batch, dict(req.bad), req.id
    elif type(req) is state_pb2.PipelineRequest:
        batch, bad, rid = req.batch, {}, req.id
    else:
        batch, bad = req, {}
    for i, op in enumerate(batch.ops):
        if i in bad:
            continue
        kind = op.WhichOneof("op")
        if kind is None:
            continue
        err = gate.op(getattr(op, kind).namespace, OP_ROLE[kind], f"ops[{i}] {kind}")
        if err is not None:
            bad[i] = err
    if not bad:
        return req
    return Partial(batch, bad, rid)


_OP_DESC = state_pb2.BatchOp.DESCRIPTOR


def op_error(i: int, raw: bytes, e: Exception) -> errors.InvalidArgumentError:
    """The error of op `i` of a batch whose bytes are not a BatchOp, naming what is wrong."""
    try:
        fields = [(n, v) for n, v in read_fields(raw) if n in _OP_DESC.fields_by_number]
    except WireError as w:
        return errors.InvalidArgumentError(f"ops[{i}] is not a valid {_OP_DESC.full_name} ({w})")
    for n, v in reversed(fields):  # the last op field on the wire is the one set
        if isinstance(v, bytes):
            f = _OP_DESC.fields_by_number[n]
            assert f.message_type is not None  # every BatchOp field is a message
            return errors.InvalidArgumentError(f"ops[{i}].{f.name}: {diagnose(f.message_type, v, e)}")
    return errors.InvalidArgumentError(f"ops[{i}] is not a valid {_OP_DESC.full_name} ({e})")


def split_batch(data: bytes) -> Partial:
    """A BatchRequest that failed to parse whole, op by op (raises WireError when even its
    framing is broken)."""
    batch = state_pb2.BatchRequest()
    bad: dict[int, errors.ShardstateError] = {}
    for number, raw in read_fields(data):
        if number == 2 and isinstance(raw, int):
            batch.max_response_bytes = raw & 0xFFFFFFFFFFFFFFFF  # the last one wins, as in protobuf
            continue
        if number != 1:
            continue  # an unknown field, kept out of the way
        if not isinstance(raw, bytes):
            raise WireError("ops must be length-delimited")
        op = batch.ops.add()
        try:
            op.ParseFromString(raw)
        except Exception as e:
            op.Clear()
            bad[len(batch.ops) - 1] = op_error(len(batch.ops) - 1, raw, e)
    return Partial(batch, bad)


def _batch_deserializer(data: bytes) -> Any:
    try:
        return state_pb2.BatchRequest.FromString(data)
    except Exception as e:
        try:
            return split_batch(data)
        except WireError:
            return Malformed(f"malformed request: not a valid shardstate.v1.BatchRequest ({e})")


def _pipeline_deserializer(data: bytes) -> Any:
    try:
        return state_pb2.PipelineRequest.FromString(data)
    except Exception as e:
        fields: list[tuple[int, int | bytes]] = []
        try:
            read_fields(data, fields)
            framed = True
        except WireError:
            framed = False  # `fields` holds what came before the break
        ids = [v for n, v in fields if n == 1 and isinstance(v, int)]
        rid = ids[-1] if ids else 0
        try:
            batches = [v for n, v in fields if n == 2 and isinstance(v, bytes)]
            if not framed or len(ids) + len(batches) != sum(1 for n, _ in fields if n in (1, 2)):
                raise WireError("id must be a varint and batch a message")
            part = split_batch(b"".join(batches))  # repeated embedded messages merge
            part.id = rid
            return part
        except WireError:
            return Malformed(f"malformed request: not a valid shardstate.v1.PipelineRequest ({e})", rid)


SPECIAL = {"shardstate.v1.BatchRequest": _batch_deserializer, "shardstate.v1.PipelineRequest": _pipeline_deserializer}




def register(server: grpc.aio.Server, service: ServiceDescriptor, behaviors: dict[str, Callable[..., Any]]) -> None:
    """grpcserve.register with the shard's Batch and Pipeline deserializers."""
    grpcserve.register(server, service, behaviors, SPECIAL)
