"""faiss's exact Hamming range search over the same hashes (run by ``benchmarks.dedup_speed``
in its own process, with faiss-cpu from ``.venv-faiss`` on PYTHONPATH).

Two indexes, each at its best exact setting for 64-bit codes within ``max_distance`` bits:
``flat`` (``IndexBinaryFlat``: every pair, SIMD popcount) and ``multihash``
(``IndexBinaryMultiHash``: four 16-bit tables, probes of up to 2 flipped bits, exact up to 11
bits by the same pigeonhole as ours). Prints one JSON line: seconds (index and search, not the
import) and the pairs, written to ``--pairs`` as (i, j), i < j, for the caller to compare.

Usage: ``python -m benchmarks.faiss_peer hashes.npy --index flat --pairs out.npy``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hashes", help="a .npy file of uint64 hashes")
    parser.add_argument("--index", choices=["flat", "multihash"], required=True)
    parser.add_argument("--max-distance", type=int, default=10)
    parser.add_argument("--pairs", required=True, help="where to write the pairs (.npy)")
    args = parser.parse_args()
    hashes = np.load(args.hashes)
    codes = np.ascontiguousarray(hashes).view(np.uint8).reshape(len(hashes), 8)
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    if args.index == "flat":
        index = faiss.IndexBinaryFlat(64)
    else:
        if args.max_distance > 11:
            raise SystemExit("four 16-bit tables with 2 flips are exact up to 11 bits only")
        index = faiss.IndexBinaryMultiHash(64, 4, 16)
        index.nflip = 2
    index.add(codes)
    limits, _, found = index.range_search(codes, args.max_distance + 1)  # distance < radius
    seconds = time.perf_counter() - started
    queries = np.repeat(np.arange(len(hashes)), np.diff(limits.astype(np.int64)))
    keep = queries < found
    pairs = np.stack([queries[keep], found[keep]], axis=1)
    np.save(args.pairs, pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))])
    print(json.dumps({"seconds": seconds, "pairs": int(keep.sum())}))


if __name__ == "__main__":
    main()
