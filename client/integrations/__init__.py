"""Adapters for agent frameworks (shardstate.integrations.*)."""
