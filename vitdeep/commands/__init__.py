"""What each `vitdeep` command does once its arguments are parsed: orchestration that prints,
writes outputs and names flags, apart from the library it calls (models, engine, data, analysis,
planner). `vitdeep ablate`'s own modules are the package `vitdeep.ablate`."""
