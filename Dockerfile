# One image for every role; the command picks the role (see docker-compose.yml).
FROM python:3.11-slim-bookworm

# libtommath1: needed by the embedded Firebird engine of the firebird-embedded wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libtommath1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 etl
WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY etl_tasks ./etl_tasks
COPY workers ./workers
RUN pip install --no-cache-dir .

USER etl
ENV ETL_DATA_DIR=/data \
    ETL_DUCKDB_PATH=/data/warehouse.duckdb \
    ETL_FIREBIRD_DSN=/data/demo/billing.fdb \
    ETL_FIREBIRD_RUNTIME_DIR=/data/.firebird
VOLUME ["/data"]
CMD ["python", "-m", "workers.fleet"]
