# flowprep + strnet + pipelines. VARIANT=cpu (default) installs torch's CPU wheel; VARIANT=cuda
# installs the CUDA wheel from TORCH_INDEX and runs flow and training on NVIDIA GPUs with
# `docker run --gpus all`. Nothing here was built on the development machines (no Docker engine
# there); the file is linted with hadolint in CI.
#   docker build -t strnet .                                   # CPU
#   docker build -t strnet:cuda --build-arg VARIANT=cuda .     # CUDA (TORCH_INDEX below)
FROM python:3.11.11-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# torch.compile needs a C/C++ compiler at run time: inductor builds its CPU kernels with g++ and
# Triton builds a small launcher with gcc on CUDA; without one, flow falls back to eager (slower).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first and explicitly, so `pip install .` finds it satisfied and pulls no other build.
RUN if [ "$VARIANT" = "cuda" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX"; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu; \
    else \
        echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1; \
    fi

WORKDIR /opt/strnet
COPY pyproject.toml README.md ./
COPY flowprep ./flowprep
COPY strnet ./strnet
COPY pipelines ./pipelines
COPY docker/entrypoint.sh /usr/local/bin/strnet-entrypoint
RUN pip install .

# A non-root user that owns the folders it writes: /data (videos, frames, shards) and /work (runs).
RUN useradd --create-home --uid 10001 runner \
    && mkdir -p /data /work \
    && chown 10001:10001 /data /work
USER 10001
WORKDIR /work
ENTRYPOINT ["strnet-entrypoint"]
CMD ["--help"]
