"""Prefect flows that compose the tasks in `tasks/` into the retraining pipeline."""
