"""drkit: backup and disaster recovery for PostgreSQL."""

import os

# drkit uses numpy for page masks and XOR, never for linear algebra: without this, importing
# numpy starts an OpenBLAS thread per core, which spin for a while and take ~0.1 s of CPU from
# the decoding a restore runs on the same cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
