"""KVFabric Kubernetes operator (KVCachePool reconciler, pod webhook): not built yet, see issue 3."""
