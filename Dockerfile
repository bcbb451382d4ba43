# One image for every role; the command picks the role (docker-compose.yml). Nothing here
# is left to "latest": the interpreter is the one the tests ran on (3.11.7 on bookworm), the
# Debian packages are the versions the tests ran with, and pip installs the project's pinned
# dependencies under deploy/constraints.txt, the whole set the tests ran with
# (tests/unit/test_deploy.py checks all three against the test machine).
# To pin the base by digest too: docker buildx imagetools inspect python:3.11.7-slim-bookworm,
# then FROM python:3.11.7-slim-bookworm@sha256:<digest>.
FROM python:3.11.7-slim-bookworm

# The embedded Firebird engine of the firebird-embedded wheel (an embedded ETL_FIREBIRD_DSN,
# `etl demo-data`) loads libtommath (libtommath1) and, with dlopen, ICU (libicu72; without it
# every connection fails with "Could not find acceptable ICU library") and zlib; its
# libtomcrypt ships in the wheel; libstdc++6 and zlib1g are in the base image already. The
# same client library reaches a Firebird server. After a Debian security update replaces a
# version, bump it here and in the test machine together.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        libtommath1=1.2.0-6+deb12u1 \
        libicu72=72.1-3+deb12u1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY deploy/constraints.txt ./deploy/constraints.txt
COPY pyproject.toml README.md beat_schedule.py ./
COPY etl_tasks ./etl_tasks
COPY workers ./workers
# A plain (not editable) install: the code is read from site-packages, /app is only the source.
RUN pip install --constraint deploy/constraints.txt . \
    && python -c "import firebird.embedded, duckdb, pyarrow, etl_tasks"

# Non-root. Its folders exist before the volumes are mounted on them, so a new named volume
# starts owned by this user: /data (inboxes, demo data), /warehouse (DuckDB, the SQLite
# fallback, the spool: the loader's), /var/lib/etl/firebird (the Firebird client's
# configuration and the embedded engine's lock folder, per container).
RUN useradd --create-home --uid 10001 --user-group etl \
    && mkdir -p /data /warehouse /var/lib/etl/firebird \
    && chown etl:etl /data /warehouse /var/lib/etl/firebird \
    && chmod 0750 /warehouse
USER etl

ENV ETL_ENV=production \
    ETL_DATA_DIR=/data \
    ETL_DUCKDB_PATH=/warehouse/warehouse.duckdb \
    ETL_SQLITE_PATH=/warehouse/fallback.sqlite \
    ETL_SPOOL_DIR=/warehouse/spool \
    ETL_FIREBIRD_RUNTIME_DIR=/var/lib/etl/firebird \
    ETL_LOG_FORMAT=json
VOLUME ["/data", "/warehouse"]

# No HEALTHCHECK here: one image runs several roles, each checked its own way
# (`python -m workers.health fleet|loader|beat|URL`, set per service in docker-compose.yml).
# SIGTERM is a warm shutdown: a worker finishes its task (compose gives it stop_grace_period).
CMD ["python", "-m", "workers.fleet"]
