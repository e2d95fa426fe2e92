"""Test rig: real PostgreSQL clusters, S3 (moto / MinIO) and Vault (OpenBao) for drkit's tests.

Import it as ``rig`` (``from rig.postgres import PgCluster``); ``tests/conftest.py`` puts
``tests/`` on ``sys.path``. Nothing in here imports pytest, so benchmarks and demos can reuse it.
"""
