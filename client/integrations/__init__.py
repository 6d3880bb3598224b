"""Adapters for agent frameworks (shardstate.integrations.*).

Each takes a client or an address. An address makes a client with the defaults (plaintext);
for TLS or any other client option pass a `Client`/`AsyncClient` you made, e.g.
`AsyncClient(addr, ca_file="ca.pem")`."""
