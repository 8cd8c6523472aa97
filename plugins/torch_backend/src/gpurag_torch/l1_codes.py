"""Byte codes for l1's shortlist: integer sums of absolute byte differences, with an exact bound on their error.

Every element v is coded as the signed byte ``c = clamp(round(v / s), -127, 127)``, one scale ``s`` for the
whole database (`code_scale`: a quarter power of two at least ``max|v| / 127``, so a batch of like rows
appended later gets the same scale). Per dimension the triangle inequality gives
``||q - x| - s |c_q - c_x|| <= |q - s c_q| + |x - s c_x|``, so with the code distance ``SAD = Σ|c_q - c_x|``
(an exact integer) and each vector's coding error ``E(v) = Σ|v_d - s c_d|``::

    |l1(q, x) - s SAD| <= E(q) + E(x)

A scan that ranks rows by SAD hands over a cutoff ``SAD_cut``: no row left out has a smaller SAD, so
every row left out lies at l1 >= ``s SAD_cut - E(q) - max E(x)`` (`lower_bound_cutoff`), the bound the
re-scored shortlist is certified against (`DistanceBackend.topk`'s reduced-precision contract). E is
summed in float32 and widened by a bound on that sum's own rounding.

Layout: the codes of D dimensions are packed four to a little-endian int32 word (dimension ``4w + b`` in
byte ``b`` of word ``w``; the last word padded with zero bytes in rows and queries alike), rows
column-major ``(W, N)`` (`CODES_T`: consecutive rows of one word are adjacent) and queries ``(Q, W)``.
"""

from __future__ import annotations

import math

import torch

#: Column-major (W, N) int32 words of the rows' byte codes (the ``_t`` suffix: rows lie along axis 1).
CODES_T = "l1_codes_t"
#: Per row: its coding error E(x), widened (float32), and the scale its codes were made with (float32).
CODE_ERROR = "l1_code_error"
CODE_SCALE = "l1_code_scale"
#: Largest byte code (codes are symmetric: -127..127).
CODE_MAX = 127
#: float32 unit roundoff.
U32 = 2.0**-24
#: Largest dimension the codes are used for. Their bound grows with D (E ~ D s / 4 per vector) faster than the
#: spread of l1 distances (~ sqrt(D)): on an H200 (S4 W2) random normal rows certified every query at D = 100
#: and 128 from a 512-row shortlist, and none at D = 768 (bound about 21 against a gap of about 14 between the
#: 10th and 512th nearest). Code sums stay exact in float32 keys far beyond this (254 D < 2^24).
MAX_DIM = 256


def words(dim: int) -> int:
    """int32 words holding the codes of ``dim`` dimensions."""
    return -(-dim // 4)


def code_scale(vectors: torch.Tensor) -> torch.Tensor:
    """The scale (0-d float32) for ``vectors``: the least quarter power of two >= max|v| / 127 (tiny for zeros)."""
    largest = float(vectors.abs().amax()) if vectors.numel() else 0.0
    if not math.isfinite(largest) or largest > 2.0**120:
        largest = 2.0**120  # far past any useful bound: codes clamp, errors grow, certificates fail honestly
    exponent = math.ceil(4 * math.log2(max(largest, 2.0**-100) / CODE_MAX)) / 4
    return torch.tensor(2.0**exponent, dtype=torch.float32, device=vectors.device)


def encode(vectors: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 words (R, W), coding error (R,) float32) of float32 ``vectors`` (R, D) at ``scale``.

    The error is an upper bound on the exact ``Σ|v_d - s c_d|``: the float32 sum widened by its rounding
    (each term off by at most ``3u (|v| + s)``, the sum by ``(D - 1) u`` of itself; both doubled).
    """
    rows, dim = vectors.shape
    codes = torch.clamp(torch.round(vectors / scale), -CODE_MAX, CODE_MAX)
    summed = (vectors - codes * scale).abs().sum(dim=1)
    magnitude = vectors.abs().sum(dim=1) + dim * scale
    error = summed * (1 + 2 * (dim + 2) * U32) + 8 * U32 * magnitude + dim * 2.0**-120
    width = words(dim)
    packed = torch.zeros((rows, 4 * width), dtype=torch.int8, device=vectors.device)
    packed[:, :dim] = codes.to(torch.int8)
    return packed.view(torch.int32), error


def row_data(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-row arrays of the codes for float32 rows (N, D): `CODES_T`, `CODE_ERROR`, `CODE_SCALE`."""
    scale = code_scale(vectors)
    packed, error = encode(vectors, scale)
    return {
        CODES_T: packed.T.contiguous(),
        CODE_ERROR: error,
        CODE_SCALE: scale.expand(vectors.shape[0]).contiguous(),
    }


def takes(dim: int) -> bool:
    """Whether rows of dimension ``dim`` are coded (up to `MAX_DIM`, where the codes' bound certifies)."""
    return 1 <= dim <= MAX_DIM


def pack_keys(scores: torch.Tensor) -> torch.Tensor:
    """float64 keys (`gpurag_triton`'s packing, row bits 0) whose top 32 bits are float32 ``scores``' bits."""
    bits = scores.contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32).view(torch.float64)


def lower_bound(cutoff_scores: torch.Tensor, query_error: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per query (Q,) float32: a lower bound on the l1 distance of every row a code scan left out.

    ``cutoff_scores`` are the scan's cutoffs as oriented scores ``-SAD_cut`` (-inf where nothing was left
    out: the bound is then +inf). Where the rows' scales disagree (rows appended at another scale) the
    bound is -inf: no certificate holds and the caller answers in float32.
    """
    scale_all = data[CODE_SCALE]
    scale = scale_all[0].double()
    agree = scale_all.amin() == scale_all.amax()
    worst = data[CODE_ERROR].amax().double()
    bound = scale * (-cutoff_scores.double()) - query_error.double() - worst
    bound = bound - bound.abs() * 2.0**-40  # float64 rounding, far below float32's
    low = bound.float()
    low = torch.where(low.double() > bound, torch.nextafter(low, torch.full_like(low, -math.inf)), low)
    low = torch.where(torch.isneginf(cutoff_scores), math.inf, low)
    return torch.where(agree, low, -math.inf)


def lower_bound_cutoff(
    cutoff_keys: torch.Tensor, query_error: torch.Tensor, data: dict[str, torch.Tensor]
) -> torch.Tensor:
    """`lower_bound` as a cutoff key (score ``-bound``) for `gpurag_triton`'s finish kernel: keys (Q,) float64."""
    scores = (cutoff_keys.contiguous().view(torch.int64) >> 32).to(torch.int32).view(torch.float32)
    return pack_keys(-lower_bound(scores, query_error, data))
