"""The `client_or_address` argument of the asyncio adapters: an AsyncClient to share, or an
address (or addresses) for which the adapter makes an AsyncClient of its own (default options,
plaintext: for TLS pass an AsyncClient made with ca_file=) and closes it."""

from __future__ import annotations

from typing import Any

from shardstate import AsyncClient, Client


def async_client(client_or_address: Any, adapter: str) -> tuple[AsyncClient, bool]:
    """(the client, whether the adapter owns it and closes it)."""
    if isinstance(client_or_address, AsyncClient):
        return client_or_address, False
    if isinstance(client_or_address, Client):
        raise TypeError(f"{adapter} is asyncio: pass a shardstate.AsyncClient or an address, "
                        "not the sync shardstate.Client")
    if isinstance(client_or_address, str) or (
            isinstance(client_or_address, list | tuple)
            and client_or_address and all(isinstance(a, str) for a in client_or_address)):
        return AsyncClient(client_or_address), True
    raise TypeError(f"{adapter} takes a shardstate.AsyncClient or a router address "
                    f"('host:port'), got {type(client_or_address).__name__}")
