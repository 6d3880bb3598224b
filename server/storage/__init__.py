"""The storage engine of a shard: key encoding, LevelDB engine, change log, expiry."""
