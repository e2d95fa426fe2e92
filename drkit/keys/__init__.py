"""Key management operations: ``drkit keys rotate``, ``rewrap`` and ``status``.

They work on the key records of a repository, never on data: a backup's records live at
``backup/<label>/key/<nnnn>.json`` and a WAL key period's at ``wal-keys/<period>/<nnnn>.json``.
Records are write-once; rewrapping adds the next record of a set and readers use the newest record
that unwraps.
"""
