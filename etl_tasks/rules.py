"""The validation rules a declared dataset may list, and the column types they judge.

Plain declarations (pydantic models, read from the pipeline config); `checks.py` compiles
them to pandera checks. Each rule names the column(s) it judges, and its failure reason is
"<column>: <words>": the rule kind's words, or its `message`. Reasons never hold a value.

| rule | fields | reason |
|---|---|---|
| `not_null` | column | `mrn: required` |
| `unique` | columns, scope (`chunk`, `file`) | `result_id: duplicate within file` |
| `in_set` | column, values | `status: must be one of final, corrected` |
| `pattern` | column, pattern (whole text) | `zip: must match [0-9]{5}` |
| `range` | column, min / above, max / below | `value: must be from 0 to 100` |
| `date_range` | column, not_before, not_after (date or `today`) | `born: must not be after today` |
| `compare` | left, op (`<` `<=` `==` `!=` `>=` `>`), right | `end: must not be before start` |

Column types: `text`, `integer`, `decimal` (a float), `decimal(p,s)` (exact), `date`
(YYYY-MM-DD), `sheet_date` (also M/D/YYYY and Excel serials), `timestamptz` (ISO-8601 with Z
or an offset, stored in UTC), `boolean` (true/false, yes/no, y/n, t/f, 1/0).
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

_TYPE = re.compile(r"(text|integer|decimal|date|sheet_date|timestamptz|boolean)"
                   r"(?:\((\d{1,2}),\s*(\d{1,2})\))?")
FAMILY = {"text": "text", "integer": "number", "decimal": "number", "date": "date",
          "sheet_date": "date", "timestamptz": "timestamp", "boolean": "boolean"}
"""Kinds of value a rule can judge: date bounds need a date or timestamp, and so on."""
_ORDER_WORDS = {"<": "must be before", "<=": "must not be after", "==": "must be the same as",
                "!=": "must differ from", ">=": "must not be before", ">": "must be after"}
_NUMBER_WORDS = {"<": "must be less than", "<=": "must be at most", "==": "must equal",
                 "!=": "must differ from", ">=": "must be at least", ">": "must be greater than"}


def type_parts(text: str) -> tuple[str, int | None, int | None]:
    """`decimal(12,2)` -> ("decimal", 12, 2); ValueError for a type we do not know."""
    match = _TYPE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"unknown column type {text!r} (text, integer, decimal, "
                         "decimal(precision,scale), date, sheet_date, timestamptz, boolean)")
    name, precision, scale = match.group(1), match.group(2), match.group(3)
    if precision is None:
        return name, None, None
    p, s = int(precision), int(scale)
    if name != "decimal" or not 1 <= p <= 38 or s > p:
        raise ValueError(f"{text!r}: only decimal takes (precision, scale), precision 1-38 and "
                         "scale at most the precision")
    return name, p, s


def family_of(text: str) -> str:
    return FAMILY[type_parts(text)[0]]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


class _Rule(BaseModel):
    model_config = {"extra": "forbid"}
    message: str | None = None
    """Words for the reason instead of the rule kind's own ("must be a LOINC code")."""
    families: ClassVar[frozenset[str]] = frozenset(
        {"text", "number", "date", "timestamp", "boolean"})

    @property
    def subject(self) -> str:
        """The column the reason names."""
        return str(getattr(self, "column"))  # noqa: B009 - every rule but unique/compare has one

    def columns_used(self) -> list[str]:
        return [self.subject]

    def words(self, family: str) -> str:
        raise NotImplementedError

    def reason(self, family: str) -> str:
        """`<column>: <words>`; `family` is the kind of value of the judged column."""
        return f"{self.subject}: {self.message or self.words(family)}"


class NotNull(_Rule):
    rule: Literal["not_null"]
    column: str

    def words(self, family: str) -> str:
        return "required"


class Unique(_Rule):
    rule: Literal["unique"]
    columns: list[str] = Field(min_length=1)
    scope: Literal["chunk", "file"] = "chunk"
    """`file`: a repeat anywhere earlier in the same file (the file readers flag it; a
    Firebird chunk is judged as a whole instead); `chunk`: within the chunk."""

    @property
    def subject(self) -> str:
        return ", ".join(self.columns)

    def columns_used(self) -> list[str]:
        return list(self.columns)

    def words(self, family: str) -> str:
        return f"duplicate within {self.scope}"


class InSet(_Rule):
    rule: Literal["in_set"]
    column: str
    values: list[str | int | float] = Field(min_length=1)
    families: ClassVar[frozenset[str]] = frozenset({"text", "number"})

    def words(self, family: str) -> str:
        return f"must be one of {', '.join(str(v) for v in self.values)}"


class Pattern(_Rule):
    rule: Literal["pattern"]
    column: str
    pattern: str
    """A regular expression the whole text must match."""
    families: ClassVar[frozenset[str]] = frozenset({"text"})

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a regular expression: {exc}") from None
        return value

    def words(self, family: str) -> str:
        return f"must match {self.pattern}"


class Range(_Rule):
    rule: Literal["range"]
    column: str
    min: float | None = None
    """Inclusive bounds..."""
    max: float | None = None
    above: float | None = None
    """...and exclusive ones (`above = 0`: must be > 0)."""
    below: float | None = None
    families: ClassVar[frozenset[str]] = frozenset({"number"})

    @model_validator(mode="after")
    def _bounded(self) -> Range:
        if self.min is None and self.max is None and self.above is None and self.below is None:
            raise ValueError("a range rule needs min, max, above or below")
        if (self.min is not None and self.above is not None) or (
                self.max is not None and self.below is not None):
            raise ValueError("a range rule takes min or above, and max or below, not both")
        return self

    def words(self, family: str) -> str:
        if self.min is not None and self.max is not None:
            return f"must be from {_number(self.min)} to {_number(self.max)}"
        parts = [f"{op} {_number(bound)}" for bound, op in (
            (self.min, ">="), (self.above, ">"), (self.max, "<="), (self.below, "<"))
            if bound is not None]
        return "must be " + " and ".join(parts)


DateBound = Literal["today"] | datetime.date


class DateRange(_Rule):
    rule: Literal["date_range"]
    column: str
    not_before: DateBound | None = None
    not_after: DateBound | None = None
    """`today` is the date (UTC) when the chunk is validated."""
    families: ClassVar[frozenset[str]] = frozenset({"date", "timestamp"})

    @model_validator(mode="after")
    def _bounded(self) -> DateRange:
        if self.not_before is None and self.not_after is None:
            raise ValueError("a date_range rule needs not_before, not_after or both")
        return self

    def words(self, family: str) -> str:
        if self.not_before is not None and self.not_after is not None:
            return f"must be from {self.not_before} to {self.not_after}"
        if self.not_before is not None:
            return f"must not be before {self.not_before}"
        return f"must not be after {self.not_after}"


class Compare(_Rule):
    rule: Literal["compare"]
    left: str
    op: Literal["<", "<=", "==", "!=", ">=", ">"]
    right: str
    """Rows where either side is null pass: those columns have their own rules."""
    families: ClassVar[frozenset[str]] = frozenset({"text", "number", "date", "timestamp"})

    @property
    def subject(self) -> str:
        return self.left

    def columns_used(self) -> list[str]:
        return [self.left, self.right]

    def words(self, family: str) -> str:
        words = _ORDER_WORDS if family in ("date", "timestamp") else _NUMBER_WORDS
        return f"{words[self.op]} {self.right}"


Rule = Annotated[NotNull | Unique | InSet | Pattern | Range | DateRange | Compare,
                 Field(discriminator="rule")]


def check_rules(dataset: str, columns: dict[str, str], rules: list[Rule]) -> None:
    """Each rule judges known columns of a kind it can judge; ValueError otherwise."""
    family = {name: family_of(text) for name, text in columns.items()}
    for rule in rules:
        if unknown := [c for c in rule.columns_used() if c not in family]:
            raise ValueError(f"dataset {dataset}: rule {rule.rule} names unknown columns "
                             f"{unknown} (columns: {list(family)})")
        kinds = {family[c] for c in rule.columns_used()}
        if not kinds <= rule.families or (isinstance(rule, Compare) and len(kinds) > 1):
            raise ValueError(f"dataset {dataset}: rule {rule.rule} cannot judge "
                             f"{rule.columns_used()} ({', '.join(sorted(kinds))})")
    if len([r for r in rules if isinstance(r, Unique) and r.scope == "file"]) > 1:
        raise ValueError(f"dataset {dataset}: at most one unique rule with scope file")
