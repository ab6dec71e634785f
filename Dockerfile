# syntax=docker/dockerfile:1
# Two targets from one file:
#   serve  torch-free API (onnxruntime + FAISS): docker build --target serve .
#   train  PyTorch training and export:         docker build --target train .

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 dino
COPY requirements ./requirements

FROM base AS serve
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
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["python", "-m", "service"]

FROM base AS train
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
