"""What a dropout mask costs on this CPU, step by step, for the entries of one Cardioformer step.

A ``paper`` Cardioformer training step (batch 32) draws about 130 million dropout entries
(attention maps, the residual dropout, the six dropouts of the three residual blocks, per layer).
This prints, for that many entries in chunks of 2,048 x 256 (the layer tail's chunk):

* ``torch_bernoulli_float``: ``torch.empty(...).bernoulli_(1 - p)`` on float32, what
  ``nn.Dropout`` draws (the released code's dropout);
* ``sfc64_words``: numpy SFC64 64-bit words, four 16-bit draws each (``KeepMaskStream``);
* ``torch_words``: as many 64-bit words from torch's CPU generator (``random_`` on int64);
* ``compare_numpy`` / ``compare_torch``: turning the 16-bit draws into a bool mask with numpy
  (what ``KeepMaskStream.rows`` does) or with torch's ``>=``;
* ``packbits`` / ``unpackbits``: keeping the mask as bits for backward and reading it back
  (``cardioformer_fused``);
* ``apply_uint8``: the in-place multiply that applies a mask.

    python bench/models/dropout_masks.py [--entries 130000000] [--threads 2] [--repeats 5]

Seconds for all entries, the median of the repeats, interleaved so drift hits every row alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

ROWS, COLS = 2048, 256


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=130_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chunks = max(1, args.entries // (ROWS * COLS))
    generator = np.random.SFC64(0)
    draws = generator.random_raw(ROWS * COLS // 4).view(np.int16)
    threshold = round(0.1 * 65536) - 32768
    keep = np.empty(ROWS * COLS, np.bool_)
    bits = np.packbits(keep.reshape(ROWS, COLS), axis=1, bitorder="little")
    floats, words = torch.empty(ROWS, COLS), torch.empty(ROWS * COLS // 4, dtype=torch.int64)
    keep_bytes = torch.from_numpy(keep).view(torch.uint8).view(ROWS, COLS)
    steps = {
        "torch_bernoulli_float": lambda: floats.bernoulli_(0.9),
        "sfc64_words": lambda: generator.random_raw(ROWS * COLS // 4),
        "torch_words": lambda: words.random_(),
        "compare_numpy": lambda: np.greater_equal(draws, threshold, out=keep),
        "compare_torch": lambda: torch.from_numpy(draws) >= threshold,
        "packbits": lambda: np.packbits(keep.reshape(ROWS, COLS), axis=1, bitorder="little"),
        "unpackbits": lambda: np.unpackbits(bits, axis=1, count=COLS, bitorder="little"),
        "apply_uint8": lambda: floats.mul_(keep_bytes),
    }
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(chunks):
                step()
            seconds[name].append(time.perf_counter() - start)
    print(json.dumps({"entries": chunks * ROWS * COLS, "threads": args.threads,
                      "seconds": {name: round(statistics.median(s), 4) for name, s in seconds.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
