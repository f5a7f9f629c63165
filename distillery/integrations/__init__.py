"""Integrations, one home each: registry.py (MLflow), store.py (DVC and git), expectations.py (Great Expectations),
events.py (Prefect events), webhook.py (the MLflow webhook receiver)."""
