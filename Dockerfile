# lamina's container image (no `# syntax=` line: BuildKit would fetch that frontend from
# Docker Hub, which mirrored and air-gapped sites cannot reach; the built-in one does).
#
# Two build arguments choose what goes in:
#   VARIANT=cpu   slim Python + PyTorch's CPU wheel (default)
#   VARIANT=cuda  slim Python + PyTorch's default PyPI wheel, which bundles the CUDA
#                 runtime; the host's NVIDIA driver comes in through the container toolkit
#   WEIGHTS=mounted  no model inside: mount one read-only at /app/model_weights (default)
#   WEIGHTS=baked    `lamina weights` runs at build time (needs PyPI) and the default
#                    model is copied into the image
#
#   docker build -t lamina:cpu .
#   docker build --build-arg VARIANT=cuda --build-arg WEIGHTS=baked -t lamina:cuda .
#
# Where the wheels come from (mirrored and air-gapped sites):
#   TORCH_INDEX_URL   the index of PyTorch's wheel (default: PyTorch's CPU index for cpu,
#                     PyPI for cuda); a mirror's URL works the same
#   wheels/           a folder in the build context: pip looks there first, for torch
#                     and every dependency (`pip download -d wheels torch==2.13.0 ...`)
#   PIP_INDEX_URL     pip's own index for the other dependencies (default PyPI)
#   PIP_NO_INDEX=1    no index at all: everything from wheels/
#   make container-check builds it that way (deploy/container_check.py).
#
# The project lives at /app exactly as in a checkout (installed editable), so the
# default model folder is /app/model_weights/smollm2-135m-instruct, as on a laptop.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VARIANT=cpu
ARG WEIGHTS=mounted

# --- a virtual environment on the slim Python image ----------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv

# --- PyTorch, one stage per variant (BuildKit builds only the one VARIANT names) -------
# wheels/ is copied into these stages only, never into the runtime image; pyproject.toml
# comes along so that the COPY has a source when the context has no wheels/ folder.
FROM python-base AS torch-cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ENV PIP_FIND_LINKS=/tmp/wheels
COPY pyproject.toml wheel[s] /tmp/wheels/
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

FROM python-base AS torch-cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
ENV PIP_FIND_LINKS=/tmp/wheels
COPY pyproject.toml wheel[s] /tmp/wheels/
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# --- the project's dependencies, then its code ---------------------------------------
# torch-${VARIANT} is a stage of this file, not an image to tag (hence DL3006 off).
# hadolint ignore=DL3006
FROM torch-${VARIANT} AS build
ARG PIP_INDEX_URL
ARG PIP_NO_INDEX
WORKDIR /app
COPY pyproject.toml README.md ./
# Dependencies are installed against an empty package first, so a code change does not
# reinstall them; the editable install keeps pointing at /app/app once the code lands.
# torch is already satisfied by the stage above and stays the variant's build.
RUN mkdir app && touch app/__init__.py \
    && pip install --no-cache-dir -e ".[weights]"
COPY app ./app
# lamina's native CPU kernels: the runtime stage has no compiler, so they are compiled
# here for each portable CPU level (app/native/prebuilt/); the server loads the best one
# the host's CPU supports (docs/performance.md, "Native kernels").
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python -m app.native.build --portable \
    && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /app/model_weights \
    && python -m compileall -q app

# --- the default model, prepared at build time (only built when WEIGHTS=baked) -------
FROM build AS weights
RUN lamina weights

# --- what runs: no compilers, no pip cache, a non-root user ---------------------------
FROM python-base AS runtime
ARG VARIANT
RUN groupadd --system --gid 10001 lamina \
    && useradd --system --uid 10001 --gid lamina --home-dir /home/lamina --create-home \
        --shell /usr/sbin/nologin lamina
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
# Settings come only from LAMINA_* variables (app/config.py). Nothing is fetched from a
# model hub at run time. The NVIDIA_* variables tell the container toolkit to mount
# the driver; they are harmless on the CPU image.
ENV LAMINA_HOST=0.0.0.0 \
    LAMINA_PORT=8000 \
    LAMINA_LOG_FORMAT=json \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/home/lamina \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Not a LAMINA_* variable: unknown LAMINA_* names are rejected at start-up.
LABEL org.opencontainers.image.title="lamina" \
      org.opencontainers.image.description="LLaMA-family inference server" \
      io.lamina.variant="${VARIANT}"
USER 10001:10001
EXPOSE 8000
# /health is liveness only; /ready (load balancers, Kubernetes) says when to send traffic.
# The start period covers loading the model and warming up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LAMINA_PORT', '8000'), timeout=2)"]
# SIGTERM starts the drain: /ready turns 503, in-flight requests finish within
# LAMINA_DRAIN_TIMEOUT_S, the process exits 0. Exec form, so `lamina` is PID 1 and
# receives the signal itself (no shell in between to swallow it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lamina"]
CMD ["serve"]

FROM runtime AS weights-mounted

FROM runtime AS weights-baked
COPY --from=weights /app/model_weights /app/model_weights

# --- the image: `docker build` without --target ends here -----------------------------
# hadolint ignore=DL3006
FROM weights-${WEIGHTS} AS final
