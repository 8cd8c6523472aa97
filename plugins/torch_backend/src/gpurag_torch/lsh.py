"""LSH primitives in torch: packed sign codes and Hamming top-k."""

from __future__ import annotations

import torch

from gpurag.errors import InvalidInputError
from gpurag.metrics import TopK


def sign_codes(vectors: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """uint8 (N, ceil(B / 8)): bit j (bit j % 8 of byte j // 8) set when vectors @ planes[j] > 0.

    Projections are summed in float64 so a sign is wrong only where the float64 sum is.
    """
    if vectors.ndim != 2 or planes.ndim != 2 or vectors.shape[1] != planes.shape[1]:
        raise InvalidInputError(
            f"vectors (N, D) and planes (B, D) must share D; got {tuple(vectors.shape)} and {tuple(planes.shape)}"
        )
    n_rows, n_bits = vectors.shape[0], planes.shape[0]
    width = (n_bits + 7) // 8
    bits = (vectors.double() @ planes.double().T) > 0
    padded = torch.zeros((n_rows, width * 8), dtype=torch.uint8, device=vectors.device)
    padded[:, :n_bits] = bits
    shifts = torch.arange(8, dtype=torch.uint8, device=vectors.device)  # made on the device: no host copy
    return (padded.view(n_rows, width, 8) << shifts).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def check_codes(codes: torch.Tensor, database_codes: torch.Tensor, k: int) -> None:
    """Raise `InvalidInputError` unless the codes are uint8 (Q, W) and (N, W) and 1 <= k <= N."""
    if codes.dtype != torch.uint8 or database_codes.dtype != torch.uint8:
        raise InvalidInputError(f"codes must be uint8; got {codes.dtype} and {database_codes.dtype}")
    if codes.ndim != 2 or database_codes.ndim != 2 or codes.shape[1] != database_codes.shape[1]:
        raise InvalidInputError(
            f"codes must be (Q, W) and (N, W) with one W; got {tuple(codes.shape)} and {tuple(database_codes.shape)}"
        )
    n_rows = database_codes.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_rows:
        raise InvalidInputError(f"k must be an integer in 1..{n_rows} (the database codes); got {k!r}")


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def hamming_distances(codes: torch.Tensor, database_codes: torch.Tensor) -> torch.Tensor:
    """(Q, N) int32 Hamming distances between packed codes."""
    table = _POPCOUNT.to(codes.device)
    xor = torch.bitwise_xor(codes[:, None, :], database_codes[None, :, :])
    return table[xor.long()].sum(dim=2, dtype=torch.int32)


def hamming_topk(codes: torch.Tensor, database_codes: torch.Tensor, k: int, chunk_elements: int) -> TopK:
    """The k database codes nearest each code, nearest first: (int32 distances, int64 rows)."""
    check_codes(codes, database_codes, k)
    n_rows, width = database_codes.shape
    step = max(k, chunk_elements // max(1, codes.shape[0] * width))
    values: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        distances = hamming_distances(codes, database_codes[start:stop])
        top = torch.topk(distances, min(k, stop - start), dim=1, largest=False, sorted=False)
        values.append(top.values)
        rows.append(top.indices + start)
    all_values, all_rows = torch.cat(values, dim=1), torch.cat(rows, dim=1)
    order = torch.sort(all_values, dim=1, stable=True).indices[:, :k]
    return TopK(torch.gather(all_values, 1, order).to(torch.int32), torch.gather(all_rows, 1, order))
