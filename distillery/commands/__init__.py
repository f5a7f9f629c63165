"""The commands that are not pipeline runs: status, lineage and its verification, manual promotion and rollback,
gc, the webhook receiver (admin.py), and predict / serve with the champion (serving.py). They need no orchestration
server; the CLI calls them beside the flows."""
