"""Rebalancing on a shard (docs/design.md §6.4): the source streams (source.py), the target's
pullers (target.py), the hand-over fence (fence.py) and dropping moved data (cleanup.py).
`Migrations` is the one object a shard process wires in; the cluster map drives it.
"""

from .manager import Migrations

__all__ = ["Migrations"]
