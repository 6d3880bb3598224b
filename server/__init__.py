"""The shard server: storage engine on LevelDB, State service, replication, migration."""
