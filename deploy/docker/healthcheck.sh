#!/usr/bin/env bash
# Docker HEALTHCHECK of the grpo-ray image.
# - In a Ray node (head or worker: a raylet runs in this container): the node is healthy when Ray's
#   own health check reaches the cluster's GCS from here.
# - Otherwise (a plain `docker run ... grpo-ray train`): the stack imports.
set -euo pipefail
if pgrep -x raylet >/dev/null 2>&1 || pgrep -f "ray/core/src/ray/raylet/raylet" >/dev/null 2>&1; then
    exec ray health-check --skip-version-check
fi
exec python -c "import grpo_ray.cli, ray"
