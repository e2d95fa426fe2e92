"""drkit check: prove WAL archiving works end to end (switch, wait, read back)."""
