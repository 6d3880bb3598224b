"""The config base every process builds on: `Limits` (what one request or session may hold,
shared with the client, which checks the same limits before sending), `opt` fields with
documented defaults, and one flag per field.

Each field becomes a command-line flag (`--max-value-bytes`) whose default comes from the
environment variable `SHARDSTATE_MAX_VALUE_BYTES`, then from the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

from shardstate.common.errors import InvalidArgumentError

T = TypeVar("T")
MiB = 1024 * 1024


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and what it means (and risks)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Limits:
    """What one request or session may hold. Beyond a limit the caller gets INVALID_ARGUMENT
    or RESOURCE_EXHAUSTED naming the limit; nothing is written."""

    max_session_id_bytes: int = opt(256, "longest session id, in UTF-8 bytes")
    max_namespace_bytes: int = opt(256, "longest namespace, in UTF-8 bytes (\"\" is the namespace \"default\")")
    max_key_bytes: int = opt(1024, "longest key, in UTF-8 bytes")
    max_stream_name_bytes: int = opt(256, "longest log stream name, in UTF-8 bytes")
    max_value_bytes: int = opt(1 * MiB, "largest value or log entry")
    max_request_bytes: int = opt(4 * MiB, "largest request message (gRPC max receive size)")
    max_keys_per_session: int = opt(100_000, "keys one session may hold")
    max_session_bytes: int = opt(64 * MiB, "bytes (keys + values + log entries) one session may hold")
    max_batch_ops: int = opt(1000, "ops in one Batch or Txn, entries in one Append")
    max_page: int = opt(1000, "largest page of Scan, ReadLog and ListSessions")
    max_response_bytes: int = opt(16 * MiB, "byte budget of one Batch or Pipeline message's answer: once the results of the ops run so far reach it, the remaining ops are not run and are answered unprocessed (RESOURCE_EXHAUSTED, to be sent again; the client library does that itself), so an answer holds at most this plus one op's result. A request's own max_response_bytes is capped by it")

    def validate(self) -> None:
        for f in dataclasses.fields(Limits):  # not self: subclasses add non-numeric fields
            if getattr(self, f.name) <= 0:
                raise InvalidArgumentError(f"{f.name} must be positive, got {getattr(self, f.name)}")
        if self.max_value_bytes > self.max_request_bytes:
            raise InvalidArgumentError(
                f"max_value_bytes ({self.max_value_bytes}) cannot exceed max_request_bytes ({self.max_request_bytes})"
            )


def env_name(name: str) -> str:
    return "SHARDSTATE_" + name.upper()


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field of the config dataclass `cls`, defaulting to its env variable."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        env = env_name(f.name)
        default = f.default
        if env in os.environ:
            default = _parse_bool(os.environ[env]) if typ is bool else typ(os.environ[env])
        helptext = f"{f.metadata.get('help', '')} [env {env}; default {f.default!r}]"
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=default, help=helptext)


def from_args(cls: type[T], ns: argparse.Namespace) -> T:
    vals = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}  # type: ignore[arg-type]
    return cls(**vals)
