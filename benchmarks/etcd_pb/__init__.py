"""Generated gRPC stubs for the few etcd v3 RPCs the benchmark calls (KV Range/Put/Txn).

Written as a minimal copy of etcd's rpc.proto; regenerate with `python benchmarks/etcd_pb/generate.py`.
"""
