"""Retention: which backups and WAL a repository keeps (policy.py), and the prune that removes
the rest in the reverse of write order (operation.py)."""
