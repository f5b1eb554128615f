# One image for the Ray head and workers: `docker build -t reclra .` (CUDA torch, for GPU
# workers) or `docker build --build-arg TORCH=cpu -t reclra:cpu .` (CPU-only torch, smaller).
# It installs exactly as the README says: `make install` into /app/.venv.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG TORCH=cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.* gcc=4:* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 reclra

WORKDIR /app
COPY --chown=1000:1000 . .
USER 1000:1000
# TORCH=cpu takes torch from PyTorch's CPU wheel index; cuda takes PyPI's default CUDA build.
RUN if [ "$TORCH" = "cpu" ]; then \
        make install PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"; \
    else \
        make install; \
    fi

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_DISABLE_USAGE_STATS=1
# Ray GCS, dashboard, client, Ray metrics, reclra gRPC, reclra metrics
EXPOSE 6379 8265 10001 8080 50051 9464
CMD ["reclra", "serve", "--config", "deploy/configs/service.toml"]
