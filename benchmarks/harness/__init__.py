"""The load harness behind `shardstate bench` and `benchmarks/compare`: workloads, statistics,
reports, and the Redis and etcd stores it compares with (installed with shardstate's server
side; its own extra is `shardstate[bench]`).

A bench process is one of shardstate's own processes: importing this package chooses grpc's
transport as the shards and routers do (shardstate.common.transport.tune), so import it before
anything imports grpc.
"""

from shardstate.common import transport

transport.tune()
