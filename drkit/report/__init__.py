"""DR exercise reports: drills, cadence, backups, copies, integrity and keys of a period."""
