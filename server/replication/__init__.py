"""Replication of a shard (docs/design.md §5): a leader streams its change log to followers, followers
apply it and ack, semi-synchronous acks, promotion, demotion and the divergence audit.

`Replication` (manager.py) is the one object a shard process wires in; the rest are its parts.
"""

from .manager import Replication

__all__ = ["Replication"]
