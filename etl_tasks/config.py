"""Typed settings from the environment (`ETL_` prefix) and the pipeline config file.

Changing environment (dev, staging, production) is configuration only: another Firebird DSN,
another Redis, another DuckDB path. Defaults are the embedded demo, so a first run needs nothing.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from etl_tasks import datasets
from etl_tasks.datasets import DatasetConfig
from etl_tasks.errors import FatalError

SourceKind = Literal["firebird", "xml", "excel"]


class Settings(BaseSettings):
    """Everything that changes between environments. Read by the Celery app, workers and CLI."""

    model_config = SettingsConfigDict(env_prefix="ETL_", env_nested_delimiter="__")

    env: Literal["dev", "staging", "production"] = "dev"
    """Name of the environment, shown in logs and Sentry."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend, checkpoints and chunk staging. `etl demo` starts its own
    redis-server when ETL_REDIS_URL is not set. `redis://host:port/db`, `rediss://...`
    (TLS) or `sentinel://host:port/db;sentinel://host2:port` (the sentinels of a master
    named by ETL_REDIS_MASTER_NAME). Translated for every client in redis_conn.py."""
    redis_master_name: str | None = None
    """With Sentinel: the name the sentinels monitor the master under."""
    redis_username: str | None = None
    """An ACL user; unset: the default user (requirepass)."""
    redis_password: SecretStr | None = None
    """The Redis password (masked wherever a URL is shown; never in a log or message)."""
    redis_password_file: Path | None = None
    """Or a file holding it (a Docker/Kubernetes secret); one trailing newline is ignored."""
    redis_sentinel_password: SecretStr | None = None
    """The sentinels' own password (their requirepass), when they have one."""
    redis_sentinel_password_file: Path | None = None
    """Or a file holding it."""
    redis_tls: bool = False
    """Reach every Redis node (sentinels included) over TLS; implied by a rediss:// URL."""
    redis_tls_ca_file: Path | None = None
    """CA certificates that signed the servers' certificates (default: the system's)."""
    redis_tls_cert_file: Path | None = None
    """A client certificate, for servers that ask for one (tls-auth-clients)."""
    redis_tls_key_file: Path | None = None
    """The client certificate's private key."""
    data_dir: Path = Path("data")
    """Where the demo data, the DuckDB file and local state live by default."""
    duckdb_path: Path = Path("data/warehouse.duckdb")
    """Opened for writing only by the `load` queue's single worker."""
    pipeline_config: Path | None = None
    """TOML file listing the sources; the packaged `etl_tasks/pipeline.toml` when unset."""
    loader_memory_mb: int = Field(default=64, ge=16)
    """DuckDB's memory limit in the loader (its buffer pool; it spills to disk past it). Its
    default, most of the machine's memory, let a kept connection cache the growing table:
    the loader process grew past 370 MB on 1,000,000 claims; at 96 MB it still grew with
    the store (297 MB at 1,000,000 claims, 302 MB at 5,000,000), at 64 MB 274 MB at
    5,000,000 (benchmarks/README.md)."""
    store_lock_wait_s: float = Field(default=2.0, ge=0)
    """How long the loader waits for a store held by another process (the DuckDB file, the
    SQLite fallback's lock) before it steps down to the next store."""
    sqlite_path: Path | None = None
    """The fallback store while DuckDB is unavailable, drained back by the replay (default:
    `fallback.sqlite` in ETL_DATA_DIR)."""
    spool_dir: Path | None = None
    """The last resort when SQLite is unavailable too: fsynced Arrow files (default: `spool/`
    in ETL_DATA_DIR)."""
    replay_every_s: float = Field(default=30.0, gt=0)
    """How often beat runs the replay of the fallbacks into DuckDB."""
    quarantine_raw_days: float = Field(default=30.0, ge=0)
    """`etl_quarantine.raw` keeps a quarantined row's values (patient data) for people to fix
    the source; after this many days they are dropped (the row, reasons and pointer stay)."""
    query_cache_ttl_s: float = Field(default=300.0, ge=0)
    """`read_data` / `etl query`: how long a cached result may answer while DuckDB is down."""
    firebird_dsn: str = "data/demo/billing.fdb"
    """A local file path uses the embedded engine; `host/port:path` a Firebird server."""
    firebird_user: str = "SYSDBA"
    firebird_password: SecretStr = SecretStr("masterkey")
    firebird_runtime_dir: Path = Path("data/.firebird")
    """Embedded engine config (SuperClassic, so several workers share the file) and lock dir."""
    firebird_pool_size: int = Field(default=2, ge=1)
    """Connections per worker process."""
    firebird_pool_timeout_s: float = Field(default=10.0, gt=0)
    """How long a task waits for a pooled connection before retrying later."""
    stage_ttl_s: int = Field(default=24 * 3600, ge=60)
    """Staged chunk payloads expire after this; a run must load within it."""
    run_lease_s: int = Field(default=600, ge=10)
    """A source has at most one run in flight: a lease renewed while the run makes progress,
    released when it ends; it frees itself after this long without progress."""
    writer_lease_s: float = Field(default=30.0, ge=1)
    """One loader writes (the others stand by): it holds a lease in Redis, renewed every third
    of this; a standby takes over within about this long after the writer died or froze, and
    a writer frozen longer than this cannot commit when it wakes (load/fence.py)."""
    task_time_limit_s: int = Field(default=900, ge=10)
    """Hard time limit of any task; the broker's visibility timeout is set well above it."""
    overdue_s: float = Field(default=60.0, gt=0)
    """Work with no progress for this long is sent again by the supervisor (harmless: every
    step is idempotent). Must exceed the longest single step (one range, one file chunk)."""
    supervise_every_s: float = Field(default=10.0, gt=0)
    """How often beat runs the supervisor."""
    max_attempts: int = Field(default=3, ge=1)
    """A unit or chunk that fails (any non-transient error) or kills its worker more than
    this many times becomes a dead letter; the rest of the run goes on."""
    stall_s: float = Field(default=300.0, gt=0)
    """A waiter (`etl run --wait`, `etl wait`) reports a run with no progress for this long."""
    breaker_failures: int = Field(default=5, ge=1)
    """A source that fails this many times in a row with a transient error (Firebird
    unavailable, an unreachable inbox) has its circuit opened: shared by every worker."""
    breaker_reset_s: float = Field(default=60.0, gt=0)
    """How long an open circuit leaves its source alone (extracts wait, planned runs are
    skipped); the first call after it is a probe that closes it on success."""
    stage_window: int = Field(default=4, ge=1)
    """Backpressure: at most this many chunks of a run extracted but not committed (staged
    in Redis); more extraction waits for commits. About twice the fleet's processes (2 on
    the 2-core reference machine): enough to keep the fleet and the loader busy. Redis needs
    about window x runs in flight x a chunk's payloads for staging (docs/configuration.md)."""
    min_split_keys: int = Field(default=1_000, ge=1)
    """A key range that runs out of memory (a MemoryError, or its worker killed
    `max_attempts` times) is split in halves and tried again while it has more keys than
    this (a sampled range: rows); at the floor it becomes a dead letter. Files are never
    split."""
    resilience: bool = True
    """`ETL_RESILIENCE=off` is for benchmarks only (`benchmarks/pipeline.py --resilience
    off`), to measure what the guarantees cost: claims are not validated (every row loads,
    none is quarantined), chunks get no ledger row (a redelivered chunk is upserted again:
    nothing doubles, but nothing reconciles either), key checkpoints do not advance (every
    run reads the whole table) and no run metrics are kept. Never run production with it."""
    alert_webhook_url: SecretStr | None = None
    """Alerts are also POSTed here as JSON (retried with backoff, never blocking a run);
    secret because such URLs often carry a token."""
    health_check_every_s: float = Field(default=60.0, gt=0)
    """How often beat checks every source's staleness and every run for being stuck (no
    progress for ETL_STALL_S), even when nothing runs."""
    beat_lock_timeout_s: int = Field(default=30, ge=6)
    """Beat's leader lock in Redis (any number of beat processes, one leads and sends): the
    leader renews it every loop, a sixth of this; when the leader dies another beat takes
    over within this plus one loop."""
    staging_keys: SecretStr | None = None
    """AES-GCM keys sealing the staged payloads (patient rows) in Redis: comma-separated
    base64 of 32 bytes (`etl staging-key` makes one); the first seals, all open (rotation).
    The same on every host."""
    staging_key_file: Path | None = None
    """Or a file holding them, one per line (a Docker/Kubernetes secret). With neither, a
    development setup generates `ETL_DATA_DIR/.secrets/staging.key`; production refuses
    to start."""
    sentry_dsn: SecretStr | None = None
    """Errors go to Sentry when set (task arguments and local variables are never sent)."""
    log_format: Literal["console", "json"] = "console"
    """Worker, beat and CLI logs: readable lines, or one JSON object per line (for a log
    collector). Either way each line carries run_id, source, stage and unit/chunk id fields."""

    @property
    def fallback_path(self) -> Path:
        return self.sqlite_path or self.data_dir / "fallback.sqlite"

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"


class Thresholds(BaseModel):
    """When a run or a source deserves an alert. Set in the pipeline config under
    `[thresholds]` (defaults for every source) and per source (`thresholds = {...}`); a
    threshold set to `false` is off. A run that breaches any of them raises one alert."""

    model_config = {"extra": "forbid"}

    max_duration_s: float | None = Field(default=3600.0, gt=0)
    """A run taking longer than this (from its request to its end)."""
    min_quality_score: float | None = Field(default=0.8, ge=0, le=1)
    """Valid rows / (valid + quarantined) of a run below this."""
    max_error_rate: float | None = Field(default=0.2, ge=0, le=1)
    """Failed step attempts / all step attempts of a run above this (retries included)."""
    max_dead_letters: int | None = Field(default=0, ge=0)
    """More pieces of work dead-lettered in one run than this."""
    max_staleness_s: float | None = Field(default=86_400.0, gt=0)
    """Time since the source's last commit (a finished or partial run) above this, checked
    on a schedule even when nothing runs. Sources with `schedule = "manual"` are checked only
    when they set it themselves."""

    @field_validator("*", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        return None if value is False else value


class SourceConfig(BaseModel):
    """One entry of the pipeline config: what to read, how often, in what chunk size."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    kind: SourceKind
    location: str
    """Firebird: the table name. xml/excel: the inbox directory (`{data_dir}` is expanded)."""
    schedule: float | str = 300.0
    """Seconds between runs, a crontab expression like "*/15 * * * *", or "manual" (runs
    only when asked for: `etl run`, `run_source()`)."""
    chunk_size: int = Field(default=50_000, ge=1)
    """Rows per chunk: Firebird keys per range, file records per chunk."""
    target_table: str = ""
    """DuckDB table; defaults to its dataset's (a built-in's is its name: billing_claims...)."""
    dataset_name: str | None = Field(default=None, alias="dataset")
    """`dataset = "..."`: the dataset (columns, rules, key, version) the rows are: a
    `[[datasets]]` entry or a built-in. Default: by kind (datasets.dataset_of)."""
    key_column: str = ""
    """Firebird only: the column the work is cut along and, with no dataset named, the
    natural key of the upsert. Integer keys are cut into ranges of `chunk_size` keys, any
    other (text such as an MRN or a GUID, a date) at boundaries sampled from the table.
    Empty: no key; the table is read whole each run (the upsert keeps it from doubling).
    BILLING_CLAIMS defaults to CLAIM_ID."""
    updated_column: str = ""
    """Firebird only: the column that moves when a row changes (rows changed since the last
    run are read again and upserted); empty: none. BILLING_CLAIMS defaults to UPDATED_AT."""
    charset: str = Field(default="", pattern=r"^[A-Za-z0-9_]*$")
    """Firebird only: the character set the table's text is in, by its Firebird name
    (WIN1252, ISO8859_1, UTF8...). Empty: the one its text columns declare (UTF8 when they
    declare none, as in a database created with NONE). Set it for a NONE database whose
    applications wrote another one; bytes not valid in it quarantine their row."""
    exclude_columns: list[str] = Field(default_factory=list)
    """Firebird only: columns not to read (a binary blob the pipeline cannot carry)."""
    lookback_s: float = Field(default=300.0, ge=0)
    """Firebird only: each run re-reads rows updated this long before the last mark."""
    settle_s: float = Field(default=5.0, ge=0)
    """Files only: a file modified more recently than this is still being written."""
    layout: dict[str, Any] = Field(default_factory=dict)
    """Files only: reader options. xml: record, fields (column -> path such as
    "Patient/Id" or "Test/@code"), on_truncated ("quarantine_file" or
    "keep_complete_records"). excel: sheet, allow_macros, max_uncompressed_bytes,
    last_good_dir (default: the inbox's processed/ folder)."""

    thresholds: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the pipeline's `[thresholds]` for this source."""

    @field_validator("exclude_columns")
    @classmethod
    def _identifiers(cls, values: list[str]) -> list[str]:
        return [cls._identifier(value) for value in values]

    @field_validator("target_table", "key_column", "updated_column")
    @classmethod
    def _identifier(cls, value: str) -> str:
        # Table and column names end up in SQL text; only plain identifiers are allowed.
        if value and not value.replace("_", "").isalnum():
            raise ValueError("must be letters, digits and underscores")
        return value

    @model_validator(mode="before")
    @classmethod
    def _claims_defaults(cls, data: Any) -> Any:
        # Configs written before any table could be configured name only BILLING_CLAIMS and
        # rely on its key and change column.
        if (isinstance(data, dict) and data.get("kind") == "firebird"
                and str(data.get("location", "")).upper() == "BILLING_CLAIMS"):
            return {"key_column": "CLAIM_ID", "updated_column": "UPDATED_AT", **data}
        return data

    @model_validator(mode="after")
    def _table_location(self) -> SourceConfig:
        if self.kind == "firebird" and not self.location.replace("_", "").isalnum():
            raise ValueError("a firebird source's location is a table name (letters, digits, _)")
        if self.kind == "firebird" and self.updated_column and not self.key_column:
            raise ValueError(f"source {self.name}: updated_column needs a key_column (which "
                             "stored row would a changed row replace?)")
        return self

    @property
    def dataset(self) -> str:
        return datasets.dataset_of(self)

    @property
    def table(self) -> str:
        return self.target_table or self.dataset

    def inbox(self, settings: Settings) -> Path:
        return Path(self.location.format(data_dir=settings.data_dir))


class PipelineConfig(BaseModel):
    sources: list[SourceConfig]
    thresholds: Thresholds = Field(default_factory=Thresholds)
    datasets: list[DatasetConfig] = Field(default_factory=list)
    """Declared datasets (datasets.py), beside the built-in ones."""

    @model_validator(mode="after")
    def _datasets(self) -> PipelineConfig:
        datasets.check_pipeline(self)  # every named dataset exists; default target tables
        return self

    def thresholds_of(self, name: str) -> Thresholds:
        """The source's thresholds: its overrides over the pipeline's defaults."""
        src = self.source(name)
        merged = self.thresholds.model_dump(exclude_unset=True) | src.thresholds
        if src.schedule == "manual" and "max_staleness_s" not in src.thresholds:
            merged["max_staleness_s"] = None  # nothing promises that it runs at all
        return Thresholds.model_validate(merged)

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        known = ", ".join(s.name for s in self.sources)
        raise FatalError(f"unknown source {name!r}; the pipeline config defines: {known}")


@lru_cache
def get_settings() -> Settings:
    return Settings()


def load_pipeline(settings: Settings) -> PipelineConfig:
    """Read the pipeline config named by the settings (or the packaged default)."""
    if settings.pipeline_config is None:
        text = resources.files("etl_tasks").joinpath("pipeline.toml").read_text("utf-8")
        origin = "etl_tasks/pipeline.toml"
    else:
        try:
            text = settings.pipeline_config.read_text("utf-8")
        except OSError as exc:
            raise FatalError(f"cannot read pipeline config {settings.pipeline_config}: {exc}"
                             " (set ETL_PIPELINE_CONFIG to an existing TOML file)") from exc
        origin = str(settings.pipeline_config)
    try:
        config = PipelineConfig.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise FatalError(f"invalid pipeline config {origin}: {exc}") from exc
    names = [s.name for s in config.sources]
    if len(names) != len(set(names)):
        raise FatalError(f"invalid pipeline config {origin}: source names must be unique")
    for name in names:  # a typo in a source's thresholds is found now, not at its first run
        try:
            config.thresholds_of(name)
        except ValueError as exc:
            raise FatalError(f"invalid pipeline config {origin}: thresholds of source {name}: "
                             f"{exc}") from exc
    datasets.install(config)  # the loader finds a chunk's key by its dataset's name
    return config
