# The KubeRay image of m2m_ray: Ray's GPU image (pinned to the Ray and Python of pyproject.toml),
# the CUDA build of torch, and this project with its W&B / MLflow extras. Build it from a checkout
# of the ref the cluster runs (docs/operations.md, "Kubernetes"):
#   docker build -t REGISTRY/m2m-ray:REF . && docker push REGISTRY/m2m-ray:REF
# tests/test_dockerfile.py parses and lints this file and checks it against pyproject.toml.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# PyPI's Linux torch wheels are CUDA builds; torch goes first and pinned, so the project's
# `torch>=...` range never makes pip pick another version.
ARG TORCH_VERSION=2.13.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /home/ray/m2m_ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users m2m_ray ./m2m_ray
# The project with the dependencies pyproject.toml declares (their pins live there: DL3013 asks
# for a version on `pip install <package>`, and this is a local path), then CLIP's BPE file.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[wandb,mlflow]" \
 && python -m m2m_ray.models.clip_tokenizer fetch
