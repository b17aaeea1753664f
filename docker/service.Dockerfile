# syntax=docker/dockerfile:1.7
# convtune service image: the REST API (`convtune serve`) and the CLI, plus the MLflow tracking
# server in the compose stack. No torch, no CUDA: only the project's base dependencies
# (FastAPI, the Ray Jobs client from ray[default], MLflow) and the PostgreSQL driver.
#
# Build from the repository root:
#   docker build -f docker/service.Dockerfile -t convtune-service:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build stage: a venv with the project and its base dependencies ----
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG PIP_VERSION=25.3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install "pip==${PIP_VERSION}"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Pinned dependencies first, in their own layer (reused while only the code changes); then the
# project itself without dependencies.
COPY docker/requirements-service.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainers ./trainers
COPY search_spaces ./search_spaces
# The image must stay torch-free: fail the build if the service or the CLI pulls torch in.
RUN pip install --no-deps . \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch leaked into the service image'" \
    && python -c "import service.app, service.cli; import sys; assert 'torch' not in sys.modules"

# ---- runtime stage ----
FROM ${PYTHON_IMAGE}
RUN groupadd --gid 1000 convtune \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash convtune \
    && mkdir -p /data/convtune /data/ray_results /data/mlartifacts \
    && chown -R 1000:1000 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    CONVTUNE_HOST=0.0.0.0 \
    CONVTUNE_PORT=8000 \
    CONVTUNE_DATA_DIR=/data/convtune
# numeric, so Kubernetes can enforce runAsNonRoot
USER 1000:1000
WORKDIR /home/convtune
EXPOSE 8000
CMD ["convtune", "serve"]
