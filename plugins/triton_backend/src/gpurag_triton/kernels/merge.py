"""Merging the scan's per-split keys in groups: each group of splits keeps its KP best keys and a cutoff.

A program takes one query and ``splits_per_group`` consecutive splits of `kernels.scan`'s output (KP
keys each), keeps the KP best of their keys (a sort, or a bitonic top-k), and writes the group's
cutoff key: the largest of each split's worst kept key (it bounds what the split left out) and the
group's KP-th key (it bounds what the group drops). No row left out of a group scores above its cutoff.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def merge_groups_kernel(
    keys_ptr,
    out_ptr,
    cutoff_ptr,
    n_splits,
    splits_per_group,
    n_groups,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    TOPK: tl.constexpr = False,
):
    """out[q, g, :] = the KP best keys of group g's splits; cutoff[q, g] = the group's cutoff key.

    ``TOPK``: the KP best by a bitonic top-k (`tl.topk`) rather than a sort of all the group's keys.
    """
    pid_q = tl.program_id(0)
    group = tl.program_id(1)
    first = group * splits_per_group
    count = tl.minimum(splits_per_group, n_splits - first) * KP
    offs = tl.arange(0, BLOCK)
    keys = tl.load(keys_ptr + (pid_q * n_splits + first) * KP + offs, mask=offs < count, other=float("-inf"))
    # Each split's worst kept key (absent splits: -inf, which bounds nothing).
    split_worst = tl.min(tl.reshape(keys, (BLOCK // KP, KP)), axis=1)
    if TOPK and KP == 1:
        best = tl.max(tl.reshape(keys, (1, BLOCK)), axis=1)
        kth = tl.max(best, axis=0)
        tl.store(out_ptr + (pid_q * n_groups + group) * KP + tl.arange(0, KP), best)
    elif TOPK:
        best = tl.topk(keys, KP)
        kth = tl.min(best, axis=0)
        tl.store(out_ptr + (pid_q * n_groups + group) * KP + tl.arange(0, KP), best)
    else:
        ordered = tl.sort(keys, 0, descending=True)
        kth = tl.max(tl.where(offs == KP - 1, ordered, float("-inf")), axis=0)
        tl.store(out_ptr + (pid_q * n_groups + group) * KP + offs, ordered, mask=offs < KP)
    cutoff = tl.maximum(tl.max(split_worst, axis=0), kth)
    tl.store(cutoff_ptr + pid_q * n_groups + group, cutoff)
