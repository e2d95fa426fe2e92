"""PostgreSQL's on-disk sizes drkit relies on (the defaults every supported build uses)."""

PAGE_SIZE = 8192
RELSEG_PAGES = 131072  # 1 GiB segment files of 8 KiB pages
