# The training image: Ray nodes with GPUs (compose `ray-worker`, KubeRay worker group and
# RayJob). CUDA comes from the base image's driver stack; torch's own CUDA libraries come
# with its wheel. Build from the repository root:
#   docker build -f infra/docker/train.Dockerfile -t mmim-train:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ARG PYTHON=python3.11
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first (a layer that changes only with pyproject.toml), then the code.
WORKDIR /opt/mmim
COPY pyproject.toml README.md ./
RUN $PYTHON -m venv $VIRTUAL_ENV \
 && pip install --upgrade pip==26.0.1 \
 && pip install torch==2.13.0
COPY mmim ./mmim
COPY tasks ./tasks
COPY flows ./flows
COPY configs ./configs
COPY dvc.yaml params.yaml prefect.yaml ./
RUN pip install '.[demo,server]'

# Ray runs as this user; its sessions and the Hugging Face cache live in its home.
RUN useradd --create-home --uid 1000 mmim && chown -R mmim /opt/mmim
USER mmim
WORKDIR /home/mmim
CMD ["ray", "start", "--address=ray-head:6379", "--block"]
