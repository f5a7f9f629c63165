"""Prefect flows: they only wire tasks (order, parameters, retries, caching)."""
