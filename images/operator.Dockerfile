# KVFabric operator (KVCachePool reconciler + pod webhook). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/kvfabric/operator:0.1.0 .
FROM python:3.11-slim
WORKDIR /src
COPY connector ./connector
COPY node-agent ./node-agent
COPY operator ./operator
RUN pip install --no-cache-dir ./connector ./node-agent ./operator && rm -rf /src
USER 65532:65532
ENTRYPOINT ["kvfabric-operator"]
