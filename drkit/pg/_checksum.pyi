import numpy as np
from typing_extensions import Buffer

def checksums(
    data: Buffer | np.ndarray,
    index: Buffer | np.ndarray,
    blocks: Buffer | np.ndarray,
    out: np.ndarray,
    /,
) -> None: ...
