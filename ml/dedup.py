"""Near-duplicate pictures: a perceptual hash per image, and groups of images whose hashes are
within a small Hamming distance.

The same photo posted twice at another size or JPEG quality has different bytes but almost the
same low frequencies. :func:`perceptual_hash` keeps the signs of the 8x8 lowest DCT frequencies of
a 32x32 grey thumbnail (64 bits, compared with the median): resizing and recompression move a
few bits at most, a slight crop several, unrelated pictures about half of them.

:func:`near_pairs` finds every pair within ``max_distance`` bits without comparing all pairs
(multi-index hashing, exact): the 64 bits are cut into ``m`` blocks, and block ``k`` is given a
radius ``r_k`` with ``sum(r_k) = max_distance - m + 1``; two hashes within ``max_distance`` are
then within ``r_k`` bits in at least one block (if every block differed by ``r_k + 1`` or more,
the whole would differ by ``max_distance + 1``). Each block's hashes are bucketed by their key,
each bucket is paired with the buckets within its radius, and only those candidates are compared
in full (compiled, :mod:`ml.hamming`). How many blocks is chosen per call by the estimated work
(probes grow with ``n``, candidates with ``n**2 / 2**bits``): small sets use many short blocks,
a million hashes four 16-bit ones. :func:`groups` joins exact (sha256) and near duplicates into
connected components; the split keeps each component in one split.

Usage: ``phash = perceptual_hash(image)``; ``group_ids = groups(sha256s, phashes)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ml.cpus import available_cpus

#: Hashes at most this many bits apart are the same picture. Measured on 80 generated pictures
#: (``devkit.imageserver.render_image``): halving or enlarging moves at most 4 bits, JPEG quality
#: 30 at most 2, a 2 % crop per side 6 (median) and 12 at worst; unrelated pictures are 30 bits
#: apart (median), 14 at the closest of 3,160 pairs. Random 64-bit hashes fall within 10 bits
#: of each other about once per 100 million pairs.
MAX_DISTANCE = 10
_SIDE, _KEEP = 32, 8
#: The widest block key: its bucket table has 2**22 + 1 offsets (32 MiB).
_MAX_KEY_BITS = 22


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
    valid = np.fromiter(
        (isinstance(v, str) and len(v) == 16 and v.isascii() for v in values), bool, len(values)
    )
    out = np.zeros(len(values), dtype=np.uint64)
    chosen = [str(values[i]) for i in np.flatnonzero(valid).tolist()]
    try:  # one C-level parse of all of them; junk among them falls back to one by one
        out[valid] = np.frombuffer(bytes.fromhex("".join(chosen)), dtype=">u8")
        return out, valid
    except ValueError:
        pass
    for i in np.flatnonzero(valid).tolist():
        try:
            raw = bytes.fromhex(str(values[i]))
        except ValueError:
            raw = b""
        valid[i] = len(raw) == 8
        out[i] = int.from_bytes(raw, "big") if valid[i] else 0
    return out, valid


def _flips(bits: int, radius: int) -> np.ndarray:
    """Every ``bits``-bit mask with at most ``radius`` bits set."""
    masks = [0]
    for count in range(1, radius + 1):
        for chosen in itertools.combinations(range(bits), count):
            masks.append(sum(1 << b for b in chosen))
    return np.asarray(masks, dtype=np.int64)


def plan(count: int, max_distance: int) -> list[tuple[int, int]]:
    """(bits, radius) per block, least estimated work first among 3 to 16 blocks; a block of
    radius -1 is never searched (``max_distance`` smaller than the block count less one)."""
    best: tuple[float, list[tuple[int, int]]] | None = None
    for m in range(math.ceil(64 / _MAX_KEY_BITS), 17):
        bits = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
        total = max_distance - m + 1  # the radii's sum
        if total < -m + 1:
            continue  # not even one block could be searched
        radii = [total // m + (1 if k < total % m else 0) for k in range(m)]
        if total < 0:
            radii = [0] * (total + m) + [-1] * -total
        work = 0.0
        for b, r in zip(bits, radii, strict=True):
            if r >= 0:
                ball = sum(math.comb(b, k) for k in range(r + 1))
                # probes (a random read each) + empty keys skipped + candidates compared
                work += 2 * min(count, 2**b) * ball + 2**b / 8 + count**2 * ball / 2 ** (b + 1)
        if best is None or work < best[0]:
            best = (work, list(zip(bits, radii, strict=True)))
    assert best is not None, "max_distance must be at least 0"
    return best[1]


def near_pairs(
    hashes: np.ndarray, max_distance: int = MAX_DISTANCE, threads: int | None = None
) -> np.ndarray:
    """Index pairs ``(i, j)``, ``i < j``, of hashes at most ``max_distance`` bits apart (exact:
    every such pair, no other), shape (pairs, 2), sorted; ``threads`` share each block's keys."""
    from ml.hamming import block_pairs  # compiled on first use: download workers never need it

    if max_distance < 0:
        raise ValueError(f"max_distance must be at least 0, got {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    found: list[np.ndarray] = []
    earlier: list[tuple[int, int, int]] = []  # (shift, bit mask, radius) of the blocks done
    shift = 0
    workers = threads or available_cpus()
    with ThreadPoolExecutor(workers) as pool:
        for bits, radius in plan(len(hashes), max_distance) if len(hashes) > 1 else []:
            if radius >= 0:
                keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
                order = np.argsort(keys, kind="stable")
                offsets = np.searchsorted(keys[order], np.arange((1 << bits) + 1))
                table = np.asarray(earlier, dtype=np.uint64).reshape(-1, 3)
                ordered, masks = hashes[order], _flips(bits, radius)
                bounds = np.linspace(0, 1 << bits, 8 * workers + 1).astype(np.int64)
                jobs = [
                    pool.submit(
                        block_pairs, ordered, order, offsets, masks, lo, hi, max_distance, table
                    )
                    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
                ]
                found.extend(job.result() for job in jobs)
                earlier.append((shift, (1 << bits) - 1, radius))
            shift += bits
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def groups(
    sha256s: Sequence[str], phashes: Sequence[object], max_distance: int = MAX_DISTANCE
) -> tuple[np.ndarray, int]:
    """A group number per image (identical bytes or near-duplicate pixels, transitively), and
    how many near pairs were found. Images without a valid hash group by bytes only."""
    import pandas as pd
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(sha256s)
    if n == 0:
        return np.empty(0, dtype=np.int64), 0
    same_bytes, _ = pd.factorize(pd.Series(sha256s, dtype=object), use_na_sentinel=False)
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
