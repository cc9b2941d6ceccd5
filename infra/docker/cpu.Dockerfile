# The CPU image: MLflow server, Prefect server and worker, the Ray head. torch is the
# CPU build (a few hundred MB instead of several GB). Build from the repository root:
#   docker build -f infra/docker/cpu.Dockerfile -t mmim-cpu:0.1.0 .
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mmim
COPY pyproject.toml README.md ./
RUN python -m venv $VIRTUAL_ENV \
 && pip install --upgrade pip==26.0.1 \
 && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY mmim ./mmim
COPY tasks ./tasks
COPY flows ./flows
COPY configs ./configs
COPY dvc.yaml params.yaml prefect.yaml ./
RUN pip install '.[demo,server]'

COPY infra/docker/prefect-worker.sh /usr/local/bin/prefect-worker.sh
RUN useradd --create-home --uid 1000 mmim && chown -R mmim /opt/mmim
USER mmim
WORKDIR /home/mmim
