"""The cluster KV store's Ray side: shard actors, their client, the engine process's relay."""
