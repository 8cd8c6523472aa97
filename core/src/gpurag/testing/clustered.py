"""Seeded clustered data: a Gaussian mixture, the synthetic stand-in for embeddings in tests and benchmarks.

Needs only NumPy. Base vectors and queries drawn with one ``seed`` share their cluster centres;
a different ``sample`` draws fresh points around the same centres (held-out queries).
"""

from __future__ import annotations

from typing import Any

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


def gaussian_mixture_torch(
    n: int,
    dim: int,
    *,
    clusters: int = 1000,
    spread: float = 1.0,
    seed: int = 0,
    sample: int = 0,
    normalise: bool = True,
    device: str = "cpu",
) -> Any:
    """`gaussian_mixture`'s distribution drawn by torch on ``device`` (a float32 tensor; the host never sees it).

    The same arguments on the same device give the same tensor; the values differ from the NumPy
    generator's (another random stream), the distribution is the same.
    """
    import torch

    if n < 0 or dim < 1 or clusters < 1 or spread < 0:
        raise ValueError(f"need n >= 0, dim >= 1, clusters >= 1, spread >= 0; got {n}, {dim}, {clusters}, {spread}")
    centres_stream = torch.Generator(device=device).manual_seed(seed * 1_000_003)
    centres = torch.randn((clusters, dim), generator=centres_stream, device=device, dtype=torch.float32)
    stream = torch.Generator(device=device).manual_seed((seed * 1_000_003 + 1) * 65_537 + sample)
    out = torch.empty((n, dim), dtype=torch.float32, device=device)
    step = BLOCK_ROWS * 16
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        pick = torch.randint(0, clusters, (r1 - r0,), generator=stream, device=device)
        block = centres[pick]
        block += spread * torch.randn((r1 - r0, dim), generator=stream, device=device, dtype=torch.float32)
        if normalise:
            norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
            block /= torch.where(norms == 0, 1.0, norms)
        out[r0:r1] = block
    return out
