# syntax=docker/dockerfile:1.7
# convtune Ray node image: the Ray head and the GPU workers run this image (compose and KubeRay).
# Trials import torch/timm here, and the sweep driver (`python -m search_spaces.driver`, submitted
# as a Ray job by the API) runs on the head, so the head needs the same stack as the workers.
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t convtune-worker:0.1.0 .
#
# Base: the CUDA *base* flavour carries the CUDA runtime (cudart) and the NVIDIA container-toolkit
# settings. torch's PyPI wheels bring their own cuBLAS/cuDNN/NCCL, so the larger `runtime` flavour
# would only duplicate ~3 GB of libraries. CUDA 13.0 matches torch 2.14.1's default wheels.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# ---- build stage: a standalone CPython 3.11 and a venv with the project, no build tools kept ----
FROM ${CUDA_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
ARG PYTHON_VERSION=3.11.14
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Pinned dependencies first, in their own layer (reused while only the code changes); then the
# project itself without dependencies.
COPY docker/requirements-worker.txt /tmp/requirements.txt
RUN uv pip install --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainers ./trainers
COPY search_spaces ./search_spaces
RUN uv pip install --no-deps . \
    && python -c "import service.cli, trainers, search_spaces, torch, timm, ray.train, mlflow"

# ---- runtime stage ----
FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# wget: KubeRay's default exec probes call it; tini: reaps Ray's many child processes.
# (ca-certificates already comes with the CUDA base.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget=1.21.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 images ship a `ubuntu` user with uid 1000: take the uid over for convtune.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 convtune \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash convtune \
    && mkdir -p /data/ray_results \
    && chown -R convtune:convtune /data
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0
# numeric, so Kubernetes can enforce runAsNonRoot
USER 1000:1000
WORKDIR /home/convtune
# 6379 GCS, 8265 dashboard + Jobs API, 10001 Ray client, 52365 dashboard agent (health checks).
EXPOSE 6379 8265 10001 52365
ENTRYPOINT ["/usr/bin/tini", "--"]
# compose and KubeRay supply the `ray start ...` command; alone the image shows the CLI.
CMD ["convtune", "--help"]
