"""KVFabric node agent: the shared KV-cache pool, its index and its RPC and admin servers."""
