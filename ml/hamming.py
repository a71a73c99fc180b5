"""The compiled inner loop of the near-duplicate pair search (see :mod:`ml.dedup`).

One call scans a range of one block's keys: for each key, every key within the block's radius
(the masks), and every pair of hashes in those two buckets, keeping the pairs whose full 64-bit
hashes are within ``max_distance`` and that no earlier block has already reported. Compiled by
numba (machine popcount, no Python objects, the GIL released, so threads share the work) and
cached on disk after the first compile.

Usage: ``pairs = block_pairs(hashes, index, offsets, masks, lo, hi, max_distance, earlier)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic


def _compiled(function: Any) -> Any:
    try:
        return njit(nogil=True, cache=True)(function)
    except RuntimeError:  # no writable cache folder: compile in each process instead
        return njit(nogil=True)(function)


def _popcount_typing(typingctx: Any, value: Any) -> Any:
    """The processor's population count of a uint64 (LLVM's ctpop)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


_popcount: Any = intrinsic(_popcount_typing)


@_compiled
def block_pairs(
    hashes: np.ndarray,
    index: np.ndarray,
    offsets: np.ndarray,
    masks: np.ndarray,
    lo: int,
    hi: int,
    max_distance: int,
    earlier: np.ndarray,
) -> np.ndarray:
    """Pairs (smaller, larger original index) found from keys ``lo`` to ``hi`` of one block.

    ``hashes``/``index``: the hashes sorted by this block's key, and their original positions;
    ``offsets[k]:offsets[k + 1]`` is key ``k``'s bucket; ``masks``: every key difference within
    the block's radius; ``earlier``: one row (shift, bit mask, radius) per block searched before,
    whose pairs are not reported twice."""
    out = np.empty((1024, 2), np.int64)
    found = 0
    limit = np.uint64(max_distance)
    for key in range(lo, hi):
        a0, a1 = offsets[key], offsets[key + 1]
        if a1 == a0:
            continue
        for mask in masks:
            other = key ^ mask
            if mask != 0 and other < key:  # each pair of buckets once, from the smaller key
                continue
            b1 = offsets[other + 1]
            for a in range(a0, a1):
                for b in range(a + 1 if mask == 0 else offsets[other], b1):
                    x = hashes[a] ^ hashes[b]
                    if _popcount(x) > limit or _seen(x, earlier):
                        continue
                    if found == len(out):
                        out = np.concatenate((out, np.empty_like(out)))
                    i, j = index[a], index[b]
                    out[found, 0], out[found, 1] = min(i, j), max(i, j)
                    found += 1
    return out[:found]


@_compiled
def _seen(x: np.uint64, earlier: np.ndarray) -> bool:
    """Whether a pair that differs by ``x`` lies within an earlier block's radius."""
    for row in range(earlier.shape[0]):
        if _popcount((x >> earlier[row, 0]) & earlier[row, 1]) <= earlier[row, 2]:
            return True
    return False
