"""What each `vitdeep` command does once its arguments are parsed: orchestration that prints,
writes outputs and names flags, apart from the library it calls (models, engine, data, analysis,
planner, ablate). `cli.py` only parses and maps errors to exit codes."""
