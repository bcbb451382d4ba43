"""Datasets: what a source's rows are, which rules they must pass, and how the store keys them.

A dataset is columns with types, a list of validation rules, a natural key and a version
column (the newer version wins the upsert; none: the later load wins). Three are built in and
judged by code (`validate.py`, `transform.py`): billing_claims, lab_results and
patient_registrations. Any other is declared in the pipeline config and judged by its rules,
declared in `rules.py` and compiled once per process to pandera checks (`checks.py`):

```toml
[[datasets]]
name = "partner_results"
key = ["observation_id", "mrn"]
version = "reported_at"
rules = [
  { rule = "not_null", column = "mrn" },
  { rule = "unique", columns = ["observation_id"], scope = "file" },
  { rule = "compare", left = "reported_at", op = ">=", right = "collected_at" },
]
[datasets.columns]
observation_id = "text"
mrn = "text"
value = "decimal(10,3)"
collected_at = "timestamptz"
reported_at = "timestamptz"
```

A source names its dataset (`dataset = "partner_results"`); without one, the kind decides as
before (DATASET_OF_KIND), and a Firebird source reading any table other than BILLING_CLAIMS is
*generic*: see `spec_for`.

The seam for generic Firebird tables (reflected columns and types):

- `dataset_of(source)` is the dataset name a source feeds: `source:<name>` for a generic one.
- `spec_for(pipeline, source)` returns its DatasetSpec: key = the source's `key_column`
  (none: every loaded column is the key, so a table read whole each run never doubles),
  version = its `updated_column` (both lower-cased, as staged), target table = the source's
  `target_table` or its table's name lower-cased, and only type checks: the staged Arrow
  types are the reflected ones and are kept as they are; a row whose key is null or repeats
  within the chunk is quarantined (the upsert could not place it).
- `generic_spec(name, key=..., version=..., table=..., schema=...)` builds such a spec;
  `schema` (the reflected Arrow schema of the staged chunk, markers excluded) lets the
  quarantine replay read a row's raw values back in those types.
- A staged chunk may carry `_source_ref` (the pointer of each row); without it the pointer is
  `<KEY COLUMN>=<value>`, as for claims. A `_undecodable` marker (the "; "-joined names of a
  row's text columns whose bytes were not valid in the source's character set) quarantines
  the row with `<column>: not valid text in the source's character set`, for declared
  datasets too. Other `_` columns are markers: never loaded, never in `raw`.
- `table_key(name)` is what the loader upserts on, by dataset name (the name travels with a
  chunk through the fallback stores).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from etl_tasks.errors import FatalError
from etl_tasks.rules import NotNull, Rule, Unique, check_rules, family_of, type_parts

if TYPE_CHECKING:
    import pyarrow as pa

    from etl_tasks.checks import Compiled, Verdict
    from etl_tasks.config import PipelineConfig, SourceConfig

# Which built-in dataset each kind of source feeds when it names none.
DATASET_OF_KIND: dict[str, str] = {
    "firebird": "billing_claims",
    "xml": "lab_results",
    "excel": "patient_registrations",
}
BUILTIN = ("billing_claims", "lab_results", "patient_registrations")
CLAIMS_TABLE = "BILLING_CLAIMS"
"""The Firebird table the claim-specific path reads; any other table is generic."""
GENERIC_PREFIX = "source:"

_IDENTIFIER = r"^[a-z][a-z0-9_]{0,62}$"


@dataclass(frozen=True)
class TableKey:
    columns: tuple[str, ...]
    version: str | None = None  # newer version wins; None: the later load wins


class DatasetConfig(BaseModel):
    """One `[[datasets]]` table of the pipeline config."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=_IDENTIFIER)
    target_table: str = Field(default="", pattern=r"^$|" + _IDENTIFIER)
    """DuckDB table; defaults to the name. A source's own `target_table` wins."""
    key: list[str] = Field(min_length=1)
    """The natural key of the upsert: what "no duplicate rows" means for this data."""
    version: str | None = None
    """A row with a newer value here replaces the stored one; none: the later load wins."""
    columns: dict[str, str] = Field(min_length=1)
    """Column -> type, in the order of the target table."""
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: dict[str, str]) -> dict[str, str]:
        for name, text in columns.items():
            if not re.match(_IDENTIFIER, name) or name == "source_ref":
                raise ValueError(f"column {name!r}: lower-case letters, digits and _, not "
                                 "starting with _ and not source_ref")
            type_parts(text)
        return columns

    @model_validator(mode="after")
    def _references(self) -> DatasetConfig:
        named = [*self.key, *([self.version] if self.version else [])]
        if unknown := sorted({n for n in named if n not in self.columns}):
            raise ValueError(f"dataset {self.name}: key or version names unknown columns "
                             f"{unknown} (columns: {list(self.columns)})")
        if self.version and family_of(self.columns[self.version]) not in (
                "number", "date", "timestamp"):
            raise ValueError(f"dataset {self.name}: version {self.version} must be a number, "
                             "a date or a timestamp")
        check_rules(self.name, self.columns, self.rules)
        return self


# --- specs and the registry --------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """What the transform and the loader need to know about a dataset."""

    name: str
    key: TableKey
    table: str
    """The default target table."""
    config: DatasetConfig | None = None
    """A configured dataset's declaration; None for the built-ins and generic tables."""
    generic_schema: pa.Schema | None = None
    """A generic table's staged types, when known (the quarantine replay needs them)."""

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN

    @property
    def generic(self) -> bool:
        return self.name.startswith(GENERIC_PREFIX)

    @property
    def columns(self) -> tuple[str, ...]:
        """A configured dataset's columns (what the file readers give); () otherwise."""
        return tuple(self.config.columns) if self.config else ()

    @property
    def file_key(self) -> tuple[str, ...]:
        """Columns whose repeat within one file the readers flag (`unique`, scope file)."""
        for rule in self.config.rules if self.config else ():
            if isinstance(rule, Unique) and rule.scope == "file":
                return tuple(rule.columns)
        return ()

    @property
    def required(self) -> tuple[str, ...]:
        """Columns with a not_null rule: a workbook's header row must name them."""
        rules = self.config.rules if self.config else ()
        return tuple(dict.fromkeys(r.column for r in rules if isinstance(r, NotNull)))

    def reader_options(self, kind: str) -> dict[str, Any]:
        """What a file reader of `kind` needs to read this dataset's columns; {} for a
        built-in (the readers' own defaults are the built-ins' columns)."""
        if self.config is None:
            return {}
        options: dict[str, Any] = {"columns": self.columns, "duplicate_key": self.file_key}
        if kind == "excel":
            options["required"] = self.required or None
        return options

    @cached_property
    def compiled(self) -> Compiled:
        """The rules as pandera checks, compiled once per process and dataset."""
        from etl_tasks import checks

        if self.config is None:
            raise FatalError(f"dataset {self.name} has no declared rules to compile")
        return checks.Compiled(self.config)

    def input_schema(self) -> pa.Schema | None:
        """The staged chunk's columns, for reading quarantined raw values back; None for a
        built-in (transform.py has its own) and a generic table whose types are unknown."""
        from etl_tasks import checks

        if self.config is not None:
            return checks.text_input_schema(self.columns)
        return self.generic_schema

    def judge(self, table: pa.Table, today: datetime.date | None = None) -> Verdict:
        """Validate a staged chunk of a configured or generic dataset (rules.py)."""
        from etl_tasks import checks

        if self.config is not None:
            return self.compiled.judge(table, today)
        return checks.judge_keyed(table, self.key.columns)


_BUILTINS: dict[str, DatasetSpec] = {
    "billing_claims": DatasetSpec("billing_claims", TableKey(("claim_id",), "updated_at"),
                                  "billing_claims"),
    # ResultId is unique only within a file (DESIGN.md): another file's result with the same
    # id is a different result unless patient and test match too (then it is a correction).
    "lab_results": DatasetSpec(
        "lab_results", TableKey(("result_id", "patient_id", "test_code"), "reported_at"),
        "lab_results"),
    "patient_registrations": DatasetSpec(
        "patient_registrations", TableKey(("mrn", "clinic", "registration_date")),
        "patient_registrations"),
}
# Configured and generic datasets of the pipeline config this process loaded (`install`),
# by name: the loader finds a chunk's key by the dataset name stored with the chunk.
_installed: dict[str, DatasetSpec] = {}
# Compiled once per process: a spec is made per chunk, its checks are not.
_specs: dict[str, DatasetSpec] = {}


def is_generic(source: SourceConfig) -> bool:
    """A Firebird source with no dataset reading any table but the claims one."""
    return (source.kind == "firebird" and source.dataset_name is None
            and source.location.upper() != CLAIMS_TABLE)


def dataset_of(source: SourceConfig) -> str:
    """The name of the dataset a source feeds."""
    if source.dataset_name is not None:
        return source.dataset_name
    if is_generic(source):
        return GENERIC_PREFIX + source.name
    return DATASET_OF_KIND[source.kind]


def generic_spec(name: str, *, key: tuple[str, ...], version: str | None, table: str,
                 schema: pa.Schema | None = None) -> DatasetSpec:
    """A dataset with no declared rules: keyed by `key`, versioned by `version`."""
    return DatasetSpec(name, TableKey(key, version), table, generic_schema=schema)


def spec_for(pipeline: PipelineConfig, source: SourceConfig) -> DatasetSpec:
    """The dataset spec of a source: its key, version, table and how its rows are judged."""
    name = dataset_of(source)
    if name in _BUILTINS:
        return _BUILTINS[name]
    if is_generic(source):
        key = (source.key_column.lower(),) if source.key_column else ()
        return generic_spec(name, key=key, version=source.updated_column.lower() or None,
                            table=source.target_table or source.location.lower())
    for config in pipeline.datasets:
        if config.name == name:
            return _configured(config)
    raise FatalError(f"source {source.name} names dataset {name!r}, which the pipeline config "
                     f"does not declare (built in: {', '.join(BUILTIN)})", source=source.name)


def _configured(config: DatasetConfig) -> DatasetSpec:
    identity = config.model_dump_json()
    spec = _specs.get(identity)
    if spec is None:
        version = config.version
        spec = DatasetSpec(config.name, TableKey(tuple(config.key), version),
                           config.target_table or config.name, config)
        _specs[identity] = spec
    return spec


def check_pipeline(pipeline: PipelineConfig) -> None:
    """Every dataset a source names exists and fits its layout; fill each source's default
    target table from its dataset. Raises ValueError (the config is invalid)."""
    names = [d.name for d in pipeline.datasets]
    if clash := sorted({n for n in names if names.count(n) > 1 or n in BUILTIN}):
        raise ValueError(f"dataset names must be unique and not a built-in's: {clash}")
    for source in pipeline.sources:
        try:
            spec = spec_for(pipeline, source)
        except FatalError as exc:
            raise ValueError(str(exc)) from None
        if not source.target_table:
            source.target_table = spec.table
        paths = source.layout.get("fields" if source.kind == "xml" else "headers")
        unknown = sorted(set(paths) - set(spec.columns)) if isinstance(paths, dict) else []
        if spec.config is not None and unknown:
            raise ValueError(f"source {source.name}: layout names {unknown}, which are not "
                             f"columns of dataset {spec.name}")


def install(pipeline: PipelineConfig) -> None:
    """Register the pipeline's configured and generic datasets for `lookup` by name."""
    found = {}
    for source in pipeline.sources:
        spec = spec_for(pipeline, source)
        if not spec.builtin:
            found[spec.name] = spec
    for config in pipeline.datasets:
        found.setdefault(config.name, _configured(config))
    _installed.clear()
    _installed.update(found)


def lookup(name: str) -> DatasetSpec:
    """A dataset by name: a built-in, or one of the pipeline config this process loaded (it
    is loaded now if no config was yet)."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name not in _installed:
        from etl_tasks.resources import get_resources

        get_resources()  # loads and installs the pipeline config
    try:
        return _installed[name]
    except KeyError:
        raise FatalError(f"unknown dataset {name!r}: not built in and not declared in the "
                         "pipeline config (ETL_PIPELINE_CONFIG)") from None


def table_key(name: str) -> TableKey:
    """The natural key and version the loader upserts a dataset's rows on."""
    return lookup(name).key
