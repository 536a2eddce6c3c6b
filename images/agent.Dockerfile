# KVFabric node agent. Build from the repository root:
#   docker build -f images/agent.Dockerfile -t ghcr.io/kvfabric/agent:0.1.0 .
# GPU nodes: add the CuPy build matching the node's CUDA (--build-arg EXTRAS=gpu).
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /src
COPY connector ./connector
COPY node-agent ./node-agent
RUN pip install --no-cache-dir ./connector "./node-agent${EXTRAS:+[$EXTRAS]}" && rm -rf /src
USER 65532:65532
ENTRYPOINT ["kvfabric-agent"]
