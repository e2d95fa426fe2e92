"""Continuous WAL archiving: ``wal-push`` (archive_command), ``wal-fetch`` (restore_command).

Repository layout (beside ``backup/``, see drkit/repo/repository.py; the archive's names, objects
and reader are repository format, in drkit/repo/wal_names.py, wal_objects.py and wal_archive.py)::

    wal/<timeline>/<file name>        one write-once object per archived file
    wal-keys/<period>/<nnnn>.json     WAL key records: the period's DEK wrapped by the key provider

Object keys. ``<timeline>`` is the first 8 hex characters of the file name, so every file a
timeline produced sits under one prefix:

    000000010000000000000003                   wal/00000001/000000010000000000000003
    000000010000000000000005.partial           wal/00000001/000000010000000000000005.partial
    000000010000000000000002.00000028.backup   wal/00000001/000000010000000000000002.00000028.backup
    00000002.history                           wal/00000002/00000002.history

Object content: a small plaintext header, then one frame (drkit/codec/frame.py)::

    b"DKW1" | u8 version = 1 | u8 len(period) | period (ASCII) | u64 BE pushed_at (unix ms) | frame

The frame holds the zstd-compressed file, sealed with the data key (DEK) of the header's key
period, under the context ``f"wal:{name}:{period}:{pushed_at_ms}"``. The context binds the header
and the object's name to the frame: a changed period or push time, or an object copied to another
name, fails authentication like damage to the data does. The header is read in clear (a ranged
read of its first bytes gives the push time without the key) but is only trusted once the frame
authenticated.

Key periods. A period is the UTC date (``"20261126"``, key_period = "daily") or date and hour
(``"2026112610"``, "hourly") at push time. Each period has one DEK, made by the first pusher of
the period with ``KeyProvider.new_data_key()`` and stored wrapped as ``wal-keys/<period>/0001.json``
(the JSON record format of backup key records). Two pushers racing to create it both try the
write-once object; the loser gets ObjectExists and uses the winner's record. A key record is never
replaced; re-wrapping under a new provider key version adds ``0002.json`` (same DEK). Pushers use
the newest record that unwraps; readers try each record's DEK, newest first, until one opens the
object, so a record added to the period cannot hide its own. Because every record of a period
wraps the same DEK, a pusher never creates a second record for a period that has one.

Cost per push: synchronous ``wal-push`` makes at most one key-provider round trip (unwrap the
period's record, or create it); the async pusher keeps the period's DEK in memory.

Segment size. PostgreSQL's ``--wal-segsize`` may differ from 16 MiB; the archive does not record
it separately because every segment says it: ``WalArchive.segment_size`` is taken from the newest
backup manifest when the repository has backups, else from the long page header of the oldest
archived segment (decrypted), else 16 MiB.

Modules: ``push``, ``fetch``, ``operation`` (wal-fetch with repository fall-back), ``spool``
(async mode), ``prefetch`` and ``fetcher`` (wal-fetch --prefetch), ``config`` (the fast
configuration loader of the WAL commands); in drkit/repo/: ``wal_names`` (file names, object
keys), ``wal_objects`` (header, key periods, encode/decode), ``wal_archive`` (listing, gaps,
history). This package never imports typer, rich, psycopg or pydantic on the push/fetch path.
"""
