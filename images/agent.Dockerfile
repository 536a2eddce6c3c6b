# KVFabric node agent. Build from the repository root:
#   docker build -f images/agent.Dockerfile -t kvfabric/agent:0.1.0 .
# GPU pools (cuda: true) run the CUDA variant, which the operator names with "-cuda" appended:
#   docker build -f images/agent.Dockerfile --build-arg EXTRAS=gpu -t kvfabric/agent:0.1.0-cuda .
# (CuPy with its CUDA libraries as wheels; the node's NVIDIA runtime provides the driver.)
# Without a container engine: scripts/k8s/build-images.sh builds the CPU agent, the operator and
# a vLLM-CPU engine image as docker-save tarballs.
FROM python:3.11-slim
ARG EXTRAS=""
WORKDIR /src
COPY connector ./connector
COPY node-agent ./node-agent
RUN pip install --no-cache-dir ./connector "./node-agent${EXTRAS:+[$EXTRAS]}" && rm -rf /src \
    && echo "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "nonroot:x:65532:" >> /etc/group
USER 65532:65532
ENTRYPOINT ["kvfabric-agent"]
