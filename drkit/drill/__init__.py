"""Restore drills: restore into a sandbox, start it, check it, measure RTO and RPO, record."""
