# syntax=docker/dockerfile:1
# ledgerq's image: `ledgerq` as the entrypoint, running as a non-root user.
#
# Two stages: the first builds a wheel (the SQL migrations and functions ship inside it)
# and installs it into a virtualenv; the second copies only that virtualenv onto a slim
# base, so no compiler, pip cache or source tree reaches the image. Debian's own Python
# 3.11 serves both stages, so the image builds from Debian's packages alone.
#
#   docker build -t ledgerq .
#   docker run --rm -e LEDGERQ_DATABASE_URL=... ledgerq migrate
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime runtime
COPY sql sql
RUN python3 -m venv /opt/ledgerq \
    && /opt/ledgerq/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && /opt/ledgerq/bin/ledgerq --version

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/ledgerq ledgerq
COPY --from=build /opt/ledgerq /opt/ledgerq
ENV PATH=/opt/ledgerq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER ledgerq
WORKDIR /home/ledgerq
ENTRYPOINT ["ledgerq"]
CMD ["--help"]
