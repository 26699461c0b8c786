# syntax=docker/dockerfile:1
# paperindex: CUDA PyTorch runtime + the package; `paperindex serve` by default.
#   docker build -t paperindex .
#   docker build --build-arg BAKE_MODELS=1 -t paperindex:baked .   # models inside the image
#   docker build --build-arg EXTRAS=ray -t paperindex:ray .        # also a Ray worker (index --ray)
# The base image brings torch with CUDA; the build stage installs paperindex into a virtual
# environment that sees that torch, and the final stage copies only that environment.

ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS build
# Extras of the package to install: `--build-arg EXTRAS=ray` makes an image that also runs as a Ray
# worker (`paperindex index --ray`; docs/deployment.md).
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, against empty packages (a layer that survives source edits); then the code.
COPY pyproject.toml README.md ./
RUN mkdir -p indexer app/routes \
    && touch indexer/__init__.py app/__init__.py app/routes/__init__.py \
    && python -m venv --system-site-packages /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
COPY indexer ./indexer
COPY app ./app
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall . \
    && /opt/venv/bin/paperindex --help > /dev/null

FROM ${BASE_IMAGE} AS runtime
ARG BAKE_MODELS=0
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TORCHINDUCTOR_CACHE_DIR=/models/torch-compile \
    TRITON_CACHE_DIR=/models/torch-compile/triton \
    PAPERINDEX_HOST=0.0.0.0 \
    PAPERINDEX_PORT=8000 \
    PAPERINDEX_QDRANT_PATH=/data/index
# A C compiler: Triton builds its kernel launchers with it (the fused add + LayerNorm kernels that
# torch.compile makes on the GPU; without one they run as two kernels each, ~10% slower). The
# compiled kernels are cached in the models volume (TORCHINDUCTOR_CACHE_DIR above): loading the
# models took ~8 s on a new machine, ~5 s once the kernels were cached.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 paperindex \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin paperindex \
    && mkdir -p /models /data \
    && chown 10001:10001 /models /data
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/paperindex
# Optional: download the three models at build time (else on first start, into the /models volume).
RUN if [ "${BAKE_MODELS}" = "1" ]; then \
        python -c "from indexer.config import Settings; from indexer.runtime import load_encoders; from indexer.encode import Reranker; s = Settings(device='cpu'); load_encoders(s); s.reranker_model and Reranker(s.reranker_model, device='cpu')"; \
    fi
VOLUME ["/models", "/data"]
EXPOSE 8000
# /ready answers 200 once the models are loaded and Qdrant answers; the first start may download models.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PAPERINDEX_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["paperindex"]
CMD ["serve"]
