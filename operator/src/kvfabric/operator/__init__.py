"""KVFabric Kubernetes operator. So far: the ``KVCachePool`` spec model and the CRD generated
from it (issue 3: the reconciler, webhook and chart are still to come)."""
