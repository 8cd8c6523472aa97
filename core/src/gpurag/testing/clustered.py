"""Seeded clustered data: a Gaussian mixture, the synthetic stand-in for embeddings in tests and benchmarks.

Needs only NumPy. Base vectors and queries drawn with one ``seed`` share their cluster centres;
a different ``sample`` draws fresh points around the same centres (held-out queries).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Rows generated per block, so memory stays small whatever N is.
BLOCK_ROWS = 65_536


def gaussian_mixture(
    n: int,
    dim: int,
    *,
    clusters: int = 1000,
    spread: float = 1.0,
    seed: int = 0,
    sample: int = 0,
    normalise: bool = True,
) -> npt.NDArray[np.float32]:
    """(n, dim) float32 points of a mixture of ``clusters`` Gaussians.

    Centres are standard normal (seeded by ``seed``); each point is a centre picked uniformly plus
    ``spread`` times standard normal noise (seeded by ``seed`` and ``sample``); rows are
    L2-normalised when ``normalise`` is set (the cosine setting). The same arguments always give
    the same array.
    """
    if n < 0 or dim < 1 or clusters < 1 or spread < 0:
        raise ValueError(f"need n >= 0, dim >= 1, clusters >= 1, spread >= 0; got {n}, {dim}, {clusters}, {spread}")
    centres = np.random.default_rng([seed, 0]).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, 1, sample])
    out = np.empty((n, dim), dtype=np.float32)
    for r0 in range(0, n, BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, n)
        block = centres[rng.integers(0, clusters, r1 - r0)]
        block += np.float32(spread) * rng.standard_normal((r1 - r0, dim), dtype=np.float32)
        if normalise:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block /= np.where(norms == 0, 1, norms)
        out[r0:r1] = block
    return out
