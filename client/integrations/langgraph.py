"""LangGraph on shardstate (`pip install 'shardstate[langgraph]'`): checkpointers and stores.

    from shardstate.integrations.langgraph import AsyncShardStateSaver
    saver = AsyncShardStateSaver("127.0.0.1:7400", ttl=7 * 86400)
    graph = builder.compile(checkpointer=saver)
"""

from shardstate.integrations.langgraph_saver import AsyncShardStateSaver, ShardStateSaver
from shardstate.integrations.langgraph_store import AsyncShardStateStore, ShardStateStore

__all__ = ["AsyncShardStateSaver", "AsyncShardStateStore", "ShardStateSaver", "ShardStateStore"]
