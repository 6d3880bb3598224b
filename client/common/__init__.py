"""What the client library, the shard server and the router share: the errors table, the data
records, the cluster map and its ring, the config base, JSON logs, protobuf wire helpers, and
the process settings both servers apply in their entry points.

Imports point one way: `shardstate.common` imports only itself and the generated
`shardstate.v1`; the client (`shardstate`), `shardstate.server` and `shardstate.router` import
it. tests/test_import_boundaries.py checks it.
"""
