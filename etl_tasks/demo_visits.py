"""The demo's second Firebird table: patient visits, read by configuration alone.

PATIENT_VISITS sits in the billing database beside BILLING_CLAIMS but is what a legacy
hospital table looks like: keyed by a text visit id (not in insertion order), its text
columns in WIN1252 (clinic and clinician names with umlauts, a BLOB note with µmol/L, °C,
newlines, quotes, commas and semicolons), an exact charge, a change column. The pipeline
knows it from `etl_tasks/pipeline.toml` (source `visits`) and reflection only. Rows are
generated inside Firebird (one EXECUTE BLOCK) through a UTF8 connection, so Firebird
converts the literals to WIN1252 as it stores them. No defects are planted: a table with no
declared dataset gets type checks only, and every value here passes them.
"""

from __future__ import annotations

from etl_tasks.sources.firebird import FirebirdTarget, connect

_DDL = """CREATE TABLE PATIENT_VISITS (
    VISIT_ID VARCHAR(16) CHARACTER SET WIN1252 NOT NULL PRIMARY KEY,
    PATIENT_ID VARCHAR(20) CHARACTER SET WIN1252, CLINIC VARCHAR(40) CHARACTER SET WIN1252,
    ATTENDING VARCHAR(40) CHARACTER SET WIN1252, VISIT_DATE DATE, CHARGE NUMERIC(10,2),
    NOTE BLOB SUB_TYPE TEXT CHARACTER SET WIN1252, UPDATED_AT TIMESTAMP)"""

# MOD(i * 7919, 1000003) is distinct for every i below the prime 1000003: unique visit ids
# that do not grow with i. TRIM: a DECODE of literals is a CHAR of the longest one.
_GENERATE = """EXECUTE BLOCK (visits INTEGER = ?) AS
DECLARE i INTEGER = 1;
BEGIN
  WHILE (i <= visits) DO BEGIN
    INSERT INTO PATIENT_VISITS VALUES (
      'V' || LPAD(MOD(:i * 7919, 1000003), 7, '0'),
      'P' || LPAD(MOD(:i * 31, 250000), 6, '0'),
      TRIM(DECODE(MOD(:i, 4), 0, 'Müllerstraße Klinik', 1, 'Clinique Sainte-Thérèse',
                  2, 'North End Health', 'Ærø Sundhedshus')),
      TRIM(DECODE(MOD(:i, 5), 0, 'Dr. Zoë Faÿ', 1, 'Dr. O''Brien', 2, 'Dr. Núñez',
                  3, 'NP Søren Øst', 'Dr. Škoda')),
      DATEADD(MOD(:i * 17, 365) DAY TO DATE '2025-01-01'),
      MOD(:i * 53, 40000) / 100.0 + 20,
      IIF(MOD(:i, 11) = 0, NULL, IIF(MOD(:i, 13) = 0, '',
          'Glucose 5.4 mmol/L, creatinine 88 µmol/L;' || ASCII_CHAR(10) ||
          '"follow up" in ' || (MOD(:i, 8) + 1) || ' weeks, 37,5 °C')),
      DATEADD(:i SECOND TO TIMESTAMP '2026-02-01 00:00:00'));
    i = i + 1;
  END
END"""


def make_visits(target: FirebirdTarget, visits: int) -> None:
    """Create PATIENT_VISITS in the (existing) billing database with `visits` rows."""
    con = connect(target, charset="UTF8")
    try:
        con.execute_immediate(_DDL)
        # MAX(UPDATED_AT) at each plan comes from a descending index.
        con.execute_immediate(
            "CREATE DESCENDING INDEX IX_VISITS_UPDATED_DESC ON PATIENT_VISITS (UPDATED_AT)")
        con.commit()
        if visits:
            cur = con.cursor()
            cur.execute(_GENERATE, (visits,))
            cur.close()
            con.commit()
    finally:
        con.close()
