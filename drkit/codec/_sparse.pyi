import numpy as np
from typing_extensions import Buffer

def xor_words(
    window: Buffer | np.ndarray, record: Buffer, first: int, rows: Buffer | np.ndarray, /
) -> None: ...
