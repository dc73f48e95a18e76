#!/usr/bin/env python3
"""Cut a small dataset from challenge-format shards, for trying train_gpt.py on a CPU.

usage: python3 scripts/make_tiny_data.py SRC DEST [--train-tokens 500000] [--val-tokens 20000]
Writes DEST/fineweb_train_000000.bin and DEST/fineweb_val_000000.bin (the first tokens of SRC's
first train and val shards, same header format) and copies SRC's *.model tokenizer(s) if any.
"""
import argparse
import glob
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402  (the shard format is defined there)


def cut(src: str, dest: str, n: int) -> None:
    """Write the first n tokens of shard src (header checked by tg.open_shard) as a shard at dest."""
    tokens = np.asarray(tg.open_shard(src)[:n])
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, tokens.size)
    with open(dest, "wb") as f:
        f.write(header.tobytes() + tokens.astype("<u2").tobytes())
    print(f"{dest}: {tokens.size} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--train-tokens", type=int, default=500_000)
    ap.add_argument("--val-tokens", type=int, default=20_000)
    a = ap.parse_args()
    os.makedirs(a.dest, exist_ok=True)
    for kind, n in (("train", a.train_tokens), ("val", a.val_tokens)):
        shards = sorted(glob.glob(os.path.join(a.src, f"fineweb_{kind}_*.bin")))
        if not shards:
            raise SystemExit(f"no fineweb_{kind}_*.bin in {a.src}")
        cut(shards[0], os.path.join(a.dest, f"fineweb_{kind}_000000.bin"), n)
    for model in glob.glob(os.path.join(a.src, "*.model")):
        shutil.copy(model, a.dest)


if __name__ == "__main__":
    main()
