"""What each `vitdeep` command does once its arguments are parsed: orchestration that prints,
writes outputs and names flags, apart from the library it calls (models, engine, data, analysis).
`vitdeep demo`, `plan` and `ablate` have their own modules (`demo.py`, `planner.py`, `ablate/`)."""
