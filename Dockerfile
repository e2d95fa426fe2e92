# drkit's container image: drkit, the PostgreSQL binaries of one major version (client tools for
# connections, the server that restore drills start in their sandbox), no secret and no shell
# login, running as postgres (uid 999, like the official postgres image).
#
#   docker build -t registry.example.com/drkit:0.1.0 .
#   docker build --build-arg PG_MAJOR=15 ...      # Debian 12 ships PostgreSQL 15 only
#
# Build stage: drkit compiles two small C extensions; the compiler stays here. Debian package
# versions are not pinned (DL3008): security updates move them, a pin would break rebuilds.
FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY drkit ./drkit
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ARG PG_MAJOR=15
# The postgres user first, with the official image's ids; the Debian package then keeps it.
# No main cluster: the image runs drkit, not a database.
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
       --create-home --shell /usr/sbin/nologin postgres \
    && mkdir -p /etc/postgresql-common \
    && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       "postgresql-${PG_MAJOR}" "postgresql-client-${PG_MAJOR}" zstd ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/drkit-*.whl \
    && rm -rf /wheels \
    && install -d -o postgres -g postgres -m 0700 /run/drkit /var/lib/drkit
USER 999:999
WORKDIR /var/lib/postgresql
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["drkit"]
CMD ["--help"]
