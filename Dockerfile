# flowprep + strnet on a GPU host. PyPI's torch wheel for Linux x86_64 bundles CUDA, so this image
# runs the torch flow backend and training on NVIDIA GPUs (docker run --gpus all) and on CPU.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# torch.compile needs a C/C++ compiler at run time: inductor builds its CPU kernels with g++ and
# Triton builds a small launcher with gcc on CUDA; without one, flow falls back to eager (slower).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/strnet
COPY pyproject.toml README.md ./
COPY flowprep ./flowprep
COPY strnet ./strnet
COPY pipelines ./pipelines

RUN pip install torch==2.13.0 && pip install .

RUN useradd --create-home --uid 10001 runner
USER 10001
WORKDIR /data
ENTRYPOINT ["flowprep"]
CMD ["--help"]
