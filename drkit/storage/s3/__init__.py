"""Storage in an S3 bucket (AWS S3, MinIO, Ceph RGW, ...), below an optional key prefix.

Object ``<key>`` lives at ``<prefix>/<key>`` in the bucket. Nothing is sent on construction; the
S3 client (botocore's, which boto3 wraps) is made at the first call, and shared by every
`S3Storage` of the same configuration in the process. Credentials come only from the standard
AWS chain (environment, shared profile, web identity / IRSA, container and instance metadata),
never from drkit's configuration.

The design notes stand beside the code they describe:

- config.py: `S3Config` and `ObjectLock`, checked on construction, and S3's limits.
- storage.py: `S3Storage`, the Storage protocol; deleting in a versioned bucket.
- bucket.py: `S3Bucket`, the client and the requests (with retries) the storage, its writers
  and its readers send.
- writer.py: write once (conditional commits), streaming writes in bounded memory, Object Lock.
- reader.py: ranged and parallel reads.
- checksums.py: the checksums drkit records and checks, and what the store keeps.
- errors.py: retries, and the errors that name the repository, the endpoint and the key.

Only this package imports botocore, which is heavy; drkit.repo.open imports the package for S3
only.
"""

# drkit.errors' class, so prune catches it without importing boto3
from drkit.errors import ObjectLocked
from drkit.storage.s3.checksums import META_PART_SIZE, META_SHA256, composite_checksum
from drkit.storage.s3.checksums import _StoredChecksum as _StoredChecksum  # tests check it
from drkit.storage.s3.config import ObjectLock, S3Config
from drkit.storage.s3.errors import is_transient
from drkit.storage.s3.reader import _Verifier as _Verifier  # tests check it
from drkit.storage.s3.storage import S3Storage

__all__ = [
    "META_PART_SIZE",
    "META_SHA256",
    "ObjectLock",
    "ObjectLocked",
    "S3Config",
    "S3Storage",
    "composite_checksum",
    "is_transient",
]
