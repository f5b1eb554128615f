# One image for the Ray head and workers: `docker build -t reclra .` (CUDA torch, for GPU
# workers) or `docker build --build-arg TORCH=cpu -t reclra:cpu .` (CPU-only torch, smaller).
# Three stages: `deps` installs what reclra[cloud] runs on from pyproject.toml alone, pinned by
# deploy/constraints.txt (a code change reuses that layer: torch is not installed again);
# `wheel` builds reclra's wheel (setup.py generates the gRPC stubs); the image installs that
# wheel, not editable, into the deps' venv with no index: a dependency the deps stage missed
# fails the build. No dev tools, no pip cache, no compiler.
ARG BASE=python:3.11.7-slim-bookworm

FROM ${BASE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/constraints.txt \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
COPY deploy/constraints.txt /opt/constraints.txt

FROM base AS deps
ARG TORCH=cuda
COPY pyproject.toml /tmp/pyproject.toml
# the runtime requirements (dependencies and the cloud extra) as pyproject.toml states them;
# TORCH=cpu takes torch from PyTorch's CPU wheel index, cuda PyPI's default CUDA build
RUN python -m venv /opt/venv \
    && python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['cloud']))" > /tmp/requirements.txt \
    && if [ "$TORCH" = "cpu" ]; then \
        pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r /tmp/requirements.txt; \
    else \
        pip install --no-cache-dir -r /tmp/requirements.txt; \
    fi \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

FROM base AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && printf 'reclra[cloud] @ file://%s\n' /wheels/reclra-*.whl > /wheels/requirements.txt

FROM base
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-index --requirement /wheels/requirements.txt \
    && pip check \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 reclra \
    && install -d -o 1000 -g 1000 /app
WORKDIR /app
COPY --chown=1000:1000 deploy/configs /app/configs
USER 1000:1000
ENV PYTHONUNBUFFERED=1 \
    RAY_DISABLE_USAGE_STATS=1
# Ray GCS, dashboard, client, Ray metrics, reclra gRPC, reclra metrics
EXPOSE 6379 8265 10001 8080 50051 9464
CMD ["reclra", "serve", "--config", "/app/configs/service.toml"]
