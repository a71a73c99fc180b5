"""Near-duplicate pictures: a perceptual hash per image, and groups of images whose hashes are
within a small Hamming distance.

The same photo posted twice at another size or JPEG quality has different bytes but almost the
same low frequencies. :func:`perceptual_hash` keeps the signs of the 8x8 lowest DCT frequencies of
a 32x32 grey thumbnail (64 bits, compared with the median): resizing and recompression move a
few bits at most, a slight crop several, unrelated pictures about half of them.

:func:`near_pairs` finds every pair within ``max_distance`` bits without comparing all pairs
(multi-index hashing): the 64 bits are cut into four 16-bit blocks, and two hashes within
``max_distance`` differ in at most ``max_distance // 4`` bits of at least one block (pigeonhole).
So each block is looked up in a sorted index under every flip of up to that many bits, and only
those candidates are compared in full. :func:`groups` joins exact (sha256) and near duplicates
into connected components; the split keeps each component in one split.

Usage: ``phash = perceptual_hash(image)``; ``group_ids = groups(sha256s, phashes)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Hashes at most this many bits apart are the same picture. Measured on 80 generated pictures
#: (``devkit.imageserver.render_image``): halving or enlarging moves at most 4 bits, JPEG quality
#: 30 at most 2, a 2 % crop per side 6 (median) and 12 at worst; unrelated pictures are 30 bits
#: apart (median), 14 at the closest of 3,160 pairs. Random 64-bit hashes fall within 10 bits
#: of each other about once per 100 million pairs.
MAX_DISTANCE = 10
_SIDE, _KEEP = 32, 8
_BLOCKS, _BLOCK_BITS = 4, 16


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return np.asarray(matrix, dtype=np.float64)


_DCT = _dct_matrix(_SIDE)[:_KEEP]  # only the rows of the frequencies kept
_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def perceptual_hash(image: Image.Image) -> str:
    """The 64-bit DCT hash of ``image`` as 16 hex digits (from pixels already decoded: a 32x32
    grey thumbnail, two small matrix products)."""
    grey = np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BOX), np.float64)
    low = (_DCT @ grey @ _DCT.T).ravel()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) sets no threshold
    return f"{int((bits.astype(np.uint64) * _WEIGHTS).sum()):016x}"


def parse_hashes(values: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hashes, mask of the valid ones) from hex strings; missing or junk are invalid."""
    out = np.zeros(len(values), dtype=np.uint64)
    valid = np.zeros(len(values), dtype=bool)
    for i, value in enumerate(values):
        if isinstance(value, str) and len(value) == 16:
            try:
                out[i] = np.uint64(int(value, 16))
                valid[i] = True
            except ValueError:
                continue
    return out, valid


def _flips(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    masks = [0]
    for count in range(1, radius + 1):
        for chosen in itertools.combinations(range(bits), count):
            masks.append(sum(1 << b for b in chosen))
    return np.asarray(masks, dtype=np.uint64)


def near_pairs(
    hashes: np.ndarray, max_distance: int = MAX_DISTANCE, chunk: int = 2_000_000
) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, of hashes at most ``max_distance`` bits apart (exact:
    every such pair, no other), shape (pairs, 2)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if len(hashes) < 2:
        return np.empty((0, 2), dtype=np.int64)
    radius = max_distance // _BLOCKS
    masks = _flips(_BLOCK_BITS, radius)
    found = []
    for block in range(_BLOCKS):
        shift = np.uint64(_BLOCK_BITS * block)
        keys = (hashes >> shift) & np.uint64(0xFFFF)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        for mask in masks:
            # Each pair whose keys differ by ``mask`` is looked up once, from the key with the
            # mask's top bit clear (pairs with equal keys are ordered by index instead).
            top = np.uint64(1 << (int(mask).bit_length() - 1)) if mask else np.uint64(0)
            queries = np.flatnonzero((keys & top) == 0) if mask else np.arange(len(keys))
            wanted = keys[queries] ^ mask
            start = np.searchsorted(ordered, wanted, side="left")
            counts = np.searchsorted(ordered, wanted, side="right") - start
            found.extend(_verified(hashes, queries, order, start, counts, max_distance, chunk))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def _verified(
    hashes: np.ndarray,
    queries: np.ndarray,
    order: np.ndarray,
    start: np.ndarray,
    counts: np.ndarray,
    max_distance: int,
    chunk: int,
) -> list[np.ndarray]:
    """The candidate pairs of one block lookup whose full hashes are within the distance, as
    (smaller index, larger index), expanded ``chunk`` candidates at a time (bounded memory)."""
    hits = np.flatnonzero(counts)
    out = []
    ends = np.cumsum(counts[hits])
    begin = 0
    while begin < len(hits):
        stop = int(np.searchsorted(ends, (ends[begin - 1] if begin else 0) + chunk, "right"))
        stop = max(stop, begin + 1)
        part = hits[begin:stop]
        sizes = counts[part]
        left = np.repeat(queries[part], sizes)
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        right = order[np.repeat(start[part], sizes) + offsets]
        keep = left != right
        left, right = left[keep], right[keep]
        close = np.bitwise_count(hashes[left] ^ hashes[right]) <= max_distance
        left, right = left[close], right[close]
        out.append(np.stack([np.minimum(left, right), np.maximum(left, right)], axis=1))
        begin = stop
    return out


def groups(
    sha256s: Sequence[str], phashes: Sequence[object], max_distance: int = MAX_DISTANCE
) -> tuple[np.ndarray, int]:
    """A group number per image (identical bytes or near-duplicate pixels, transitively), and
    how many near pairs were found. Images without a valid hash group by bytes only."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sha256s)
    if n == 0:
        return np.empty(0, dtype=np.int64), 0
    _, same_bytes = np.unique(np.asarray(sha256s, dtype=object), return_inverse=True)
    hashes, valid = parse_hashes(phashes)
    index = np.flatnonzero(valid)
    pairs = index[near_pairs(hashes[index], max_distance)]
    # Nodes: the images, then one node per distinct sha256 that its copies link to.
    rows = np.concatenate([pairs[:, 0], np.arange(n)])
    cols = np.concatenate([pairs[:, 1], n + same_bytes])
    size = n + int(same_bytes.max()) + 1
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    return labels[:n].astype(np.int64), len(pairs)
