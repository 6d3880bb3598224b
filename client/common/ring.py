"""Consistent-hash placement of sessions on shards, shared by routers, shards and clients.

The ring is built over shard *ids* (never addresses, so a failover moves nothing), with
640 vnodes per unit of weight; the routing key is (namespace, session_id).
"""

from __future__ import annotations

from collections.abc import Mapping

from uhashring import HashRing

VNODES_PER_WEIGHT = 640
MEMO_SIZE = 200_000  # remembered owners per ring (then it starts over)


def routing_key(namespace: str, session_id: str) -> str:
    # \x00 cannot appear in a namespace, so distinct pairs never collide.
    return f"{namespace or 'default'}\x00{session_id}"


class Ring:
    """Maps a session to the id of the shard that owns it."""

    def __init__(self, weights: Mapping[str, int]) -> None:
        self.weights = {sid: max(1, int(w or 1)) for sid, w in weights.items()}
        nodes = {sid: {"vnodes": VNODES_PER_WEIGHT * w, "weight": 1} for sid, w in self.weights.items()}
        self._ring = HashRing(nodes) if nodes else None
        # Lookups hash with md5 in Python (~5 us); a ring never changes, so remember answers.
        self._memo: dict[tuple[str, str], str] = {}

    def __bool__(self) -> bool:
        return self._ring is not None

    def owner(self, namespace: str, session_id: str) -> str:
        memo = self._memo
        got = memo.get((namespace, session_id))
        if got is not None:
            return got
        if self._ring is None:
            raise LookupError("the ring has no shards")
        got = str(self._ring.get_node(routing_key(namespace, session_id)))
        if len(memo) >= MEMO_SIZE:
            memo.clear()
        memo[(namespace, session_id)] = got
        return got
