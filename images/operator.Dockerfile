# KVFabric operator (KVCachePool reconciler + pod webhook). Build from the repository root:
#   docker build -f images/operator.Dockerfile -t kvfabric/operator:0.1.0 .
# Without a container engine: scripts/k8s/build-images.sh.
FROM python:3.11-slim
WORKDIR /src
COPY connector ./connector
COPY node-agent ./node-agent
COPY operator ./operator
# kopf asks for the user's name (getpass): the uid needs a passwd entry
RUN pip install --no-cache-dir ./connector ./node-agent ./operator && rm -rf /src \
    && echo "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "nonroot:x:65532:" >> /etc/group
USER 65532:65532
ENTRYPOINT ["kvfabric-operator"]
