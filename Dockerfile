# Two targets from one file (plain Dockerfile syntax: the classic builder and BuildKit both read it):
#   serve  torch-free API (onnxruntime + FAISS): docker build --target serve -t dino-feature-service:serve .
#   train  PyTorch training and export:         docker build --target train -t dino-feature-service:train .
# BASE_IMAGE names any Debian-based image with python3.11 and pip on PATH, e.g. a mirror's copy:
#   docker build --build-arg BASE_IMAGE=registry.example.com/python:3.11-slim --target serve .
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (build args) point pip at a mirror or at PyTorch's CPU wheels.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 dino
COPY requirements ./requirements

# The serve stage comes before train: the classic builder builds every stage up to its target,
# so `--target serve` never pays for torch.
FROM base AS serve
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Only the serve extra, at the locked versions: no torch in this image.
RUN pip install --no-cache-dir -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY artifact ./artifact
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p /app/models /app/data && chown 10001:10001 /app/models /app/data
USER 10001
ENV DINO_HOST=0.0.0.0 \
    DINO_PORT=8000 \
    DINO_MODELS_DIR=/app/models \
    DINO_DATA_DIR=/app/data
EXPOSE 8000
# Probes the port the server really listens on (DINO_PORT, also when set at `docker run`).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('DINO_PORT', '8000'), timeout=2)"]
# On SIGTERM (`docker stop`) uvicorn drains open requests for up to 10 s, within docker's 10 s.
CMD ["python", "-m", "service"]

FROM base AS train
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
# Fashion-MNIST (the quickstart data set) comes from Debian's package.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir -r requirements/train.txt
COPY pyproject.toml README.md ./
COPY artifact ./artifact
COPY service ./service
COPY training ./training
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p /app/models /app/runs && chown 10001:10001 /app/models /app/runs
USER 10001
ENV DINO_MODELS_DIR=/app/models
CMD ["python", "-m", "training.run"]
