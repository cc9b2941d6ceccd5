#!/bin/sh
# The Prefect process worker of the compose stack. The flow runs it starts are Ray
# drivers, so this container first joins the Ray cluster as a node without resources
# (nothing is scheduled here); `ray.init()` in the flow then finds it (RAY_ADDRESS=auto).
# The checkout in MMIM_PROJECT_DIR gets a DVC remote on MinIO (local config only).
set -eu
: "${RAY_HEAD:?}" "${MMIM_PROJECT_DIR:?}" "${DVC_REMOTE_URL:?}" "${AWS_ENDPOINT_URL:?}"
ray start --address="$RAY_HEAD" --num-cpus=0 --num-gpus=0
cd "$MMIM_PROJECT_DIR"
dvc remote add --local --force --default minio "$DVC_REMOTE_URL"
dvc remote modify --local minio endpointurl "$AWS_ENDPOINT_URL"
prefect work-pool create mmim-process --type process --overwrite >/dev/null
exec prefect worker start --pool mmim-process --with-healthcheck
