"""drkit: backup and disaster recovery for PostgreSQL."""

__version__ = "0.1.0"
