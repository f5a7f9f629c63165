"""Thin Prefect tasks: adapters that call the pure code in ``models`` and do the I/O (DVC, MLflow, GX)."""
