"""The load harness behind `shardstate bench`: workloads, statistics, reports."""
