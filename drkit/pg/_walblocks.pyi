from typing_extensions import Buffer

class Scanner:
    def __init__(
        self,
        magic: int,
        compressed_mask: int,
        system_identifier: int,
        segment_size: int,
        max_blocks: int,
        since: int,
        dbase_drop: int,
        /,
    ) -> None: ...
    def feed(self, segment: Buffer, lsn: int, valid: int, /) -> None: ...
    def result(
        self,
    ) -> tuple[list[tuple[int, int, int, bytes, bytes, int | None]], bool, bool]: ...
