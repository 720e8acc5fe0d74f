"""The provider side of distillation: serve a teacher without leaking it, notice extraction
campaigns, and test whether a suspect model was distilled from yours.

`log_schema.py` is the contract between the gateway (which writes one row per request) and
the analysis (which reads them, from SQLite here or from day-partitioned Parquet at scale);
`intent.py` classifies what a prompt tries to extract. Nothing outside guard/ imports it.
"""
