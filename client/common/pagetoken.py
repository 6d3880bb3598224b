"""ListSessions page tokens: one format at routers and shards.

token = urlsafe-base64 (unpadded) of JSON {"v": 1, "after": LAST_ID, "done": [SHARD_ID, ...]}

The listing resumes after LAST_ID; `done` names the shards a router need not ask again (a
shard's own tokens have it empty). Anything else is INVALID_ARGUMENT, at a router and a shard.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from shardstate.common.errors import InvalidArgumentError


@dataclass
class Cursor:
    after: str = ""
    done: set[str] = field(default_factory=set)


def encode_token(cursor: Cursor) -> str:
    raw = json.dumps({"v": 1, "after": cursor.after, "done": sorted(cursor.done)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str) -> Cursor:
    if not token:
        return Cursor()
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("unknown version")
        after, done = data["after"], data["done"]
        if not isinstance(after, str) or not isinstance(done, list) or not all(isinstance(d, str) for d in done):
            raise ValueError("bad fields")
        after.encode()  # a lone surrogate from JSON escapes is no session id
    except (ValueError, KeyError, binascii.Error, UnicodeError, RecursionError) as e:
        raise InvalidArgumentError(f"page_token is not a ListSessions page token ({e})") from None
    return Cursor(after, set(done))
