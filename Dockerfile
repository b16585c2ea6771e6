# The image `farpool k8s render` runs (build: docker build -t REGISTRY/farpool:VERSION .).
# One image for both roles: python -m farpool.k8s_entrypoint reads FARPOOL_ROLE (head or
# worker) and the rest of its settings from the environment the manifests give each pod.
# Add your job's own packages below (every node imports what its tasks use).
FROM python:3.11-slim

WORKDIR /opt/farpool
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 farpool
# RUN pip install --no-cache-dir numpy pandas ...   <- your job's dependencies

USER farpool
WORKDIR /home/farpool
# Head port and node agent port (farpool.k8s_entrypoint's defaults come from the manifests).
EXPOSE 6380 6381
ENTRYPOINT ["python", "-m", "farpool.k8s_entrypoint"]
