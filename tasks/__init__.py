"""Prefect tasks: thin wrappers that call `mmim` (see DESIGN.md, `flows -> tasks -> mmim`)."""
