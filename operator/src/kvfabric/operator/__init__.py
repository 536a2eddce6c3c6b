"""KVFabric Kubernetes operator: the ``KVCachePool`` reconciler, the pod webhook, the CRD and the
chart's generated parts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvfabric-operator")
except PackageNotFoundError:  # a source tree on sys.path without the package installed
    __version__ = "0.1.0"
