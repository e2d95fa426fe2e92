"""The C extensions (everything else is in pyproject.toml): applying the words of XOR deltas in a
restore (drkit/codec/_sparse.c), reading which blocks WAL records touch (drkit/pg/_walblocks.c),
PostgreSQL's page checksum (drkit/pg/_checksum.c, built to be vectorised as the server builds it)
and listing a posix repository's directories with sizes (drkit/storage/_scandir.c). Building
drkit thus needs a C compiler and Python's headers."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("drkit.codec._sparse", ["drkit/codec/_sparse.c"]),
        Extension("drkit.pg._walblocks", ["drkit/pg/_walblocks.c"]),
        Extension(
            "drkit.pg._checksum",
            ["drkit/pg/_checksum.c"],
            extra_compile_args=["-O3", "-funroll-loops"],
        ),
        Extension("drkit.storage._scandir", ["drkit/storage/_scandir.c"]),
    ]
)
