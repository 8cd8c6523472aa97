"""Running top-KP selection inside a kernel, on keys that pack a float32 score with its int32 row.

A key is a float64 whose bits are the score's float32 bits followed by the row's 32 bits: ordering
keys as float64 orders them by score, then (for equal scores) by row, so ``tl.max`` / ``tl.min`` on
keys select rows with their scores, which `tl.topk` / `tl.sort` (values only) cannot. Keys are
distinct, so a key equal to the minimum marks exactly one slot.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pack_keys(scores, rows):
    """float64 keys of float32 ``scores`` and int32 ``rows`` (same shape)."""
    high = scores.to(tl.int32, bitcast=True).to(tl.int64) << 32
    low = rows.to(tl.int64) & 0xFFFFFFFF
    return (high | low).to(tl.float64, bitcast=True)


@triton.jit
def key_scores(keys):
    """The float32 scores packed in ``keys``."""
    return (keys.to(tl.int64, bitcast=True) >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def empty_best(BLOCK_Q: tl.constexpr, KP: tl.constexpr):
    """(BLOCK_Q, KP) keys of score -inf, distinct by slot; their rows (-1 - slot) match no real row."""
    slots = tl.zeros((BLOCK_Q, KP), dtype=tl.int32) - 1 - tl.arange(0, KP)[None, :]
    return pack_keys(tl.full((BLOCK_Q, KP), float("-inf"), tl.float32), slots)


@triton.jit
def offer_tile(best, threshold, scores, rows, KP: tl.constexpr):
    """Merge a (BLOCK_Q, BLOCK_N) tile of oriented ``scores`` (larger is better) at ``rows`` into ``best``.

    ``best`` (BLOCK_Q, KP) holds each query's KP best keys so far, ``threshold`` (BLOCK_Q,) the score
    of the worst of them. Only scores above the threshold are looked at, so once the running best is
    full a tile costs one comparison per score; the best of a tile's hits are moved in one per step.
    Returns the new (best, threshold).
    """
    hits = scores > threshold[:, None]
    most = tl.max(tl.sum(hits.to(tl.int32), axis=1), axis=0)
    if most > 0:
        keys = tl.where(hits, pack_keys(scores, rows), float("-inf"))
        for _ in range(tl.minimum(most, KP)):
            top = tl.max(keys, axis=1)
            low = tl.min(best, axis=1)
            replace = (best == low[:, None]) & (top > low)[:, None]
            best = tl.where(replace, top[:, None], best)
            keys = tl.where(keys == top[:, None], float("-inf"), keys)
        threshold = key_scores(tl.min(best, axis=1))
    return best, threshold


@triton.jit
def offer_tile_by_index(best, threshold, scores, n0, KP: tl.constexpr):
    """`offer_tile` for a tile of rows ``n0 + column``: the same merge, with each step's best hit found on
    the float32 scores (their column by `tl.max`'s index) and packed alone, so a step reads 32-bit
    values instead of the tile's packed 64-bit keys. Returns the new (best, threshold).
    """
    hits = scores > threshold[:, None]
    most = tl.max(tl.sum(hits.to(tl.int32), axis=1), axis=0)
    if most > 0:
        columns = tl.arange(0, scores.shape[1])[None, :]
        masked = tl.where(hits, scores, float("-inf"))
        steps = tl.minimum(most, KP)
        for step in range(steps):
            top_score, top_column = tl.max(masked, axis=1, return_indices=True)
            top = pack_keys(top_score, n0 + top_column)
            low = tl.min(best, axis=1)
            # A query without a hit left has top_score -inf: its slots stay as they are.
            better = (top_score > float("-inf")) & (top > low)
            replace = (best == low[:, None]) & better[:, None]
            best = tl.where(replace, top[:, None], best)
            if step + 1 < steps:  # the tile is read again only where another step follows
                masked = tl.where(columns == top_column[:, None], float("-inf"), masked)
        threshold = key_scores(tl.min(best, axis=1))
    return best, threshold
