#!/usr/bin/env python3
"""Compare the runs of scripts/multi_gpu_check.sh: training losses, step time, eval scores.

usage: python3 scripts/compare_runs.py OUT_DIR 1 2 4
Reads OUT_DIR/train_{n}gpu.txt, eval_{n}gpu.txt and scores_{n}gpu.npy for each GPU count n and
prints, against the first count: the largest training-loss difference over the logged steps,
step time and scaling efficiency, final val_bpb of each scored pass, and per-token score agreement.
"""
import re
import sys

import numpy as np


def train_losses(path: str) -> dict[int, float]:
    text = open(path, encoding="utf-8").read()
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+) train_loss ([\d.]+)", text, re.M)}


def find(path: str, pattern: str) -> float:
    m = re.search(pattern, open(path, encoding="utf-8").read(), re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    out, counts = sys.argv[1], [int(n) for n in sys.argv[2:]]
    base = counts[0]
    ref_losses = train_losses(f"{out}/train_{base}gpu.txt")
    ref_ms = find(f"{out}/train_{base}gpu.txt", r"train_end .*step_avg ([\d.]+)ms")
    ref_scores = np.load(f"{out}/scores_{base}gpu.npy")
    ref_ttt = find(f"{out}/eval_{base}gpu.txt", r"^final ttt val_loss \S+ val_bpb ([\d.]+)")
    print(f"{'gpus':>4} {'steps':>5} {'max |dloss|':>11} {'ms/step':>8} {'scaling eff':>11} "
          f"{'sliding bpb':>11} {'ttt bpb':>10} {'|dbpb|':>8} {'targets':>9} {'max |dnll|':>10}")
    for n in counts:
        losses = train_losses(f"{out}/train_{n}gpu.txt")
        common = sorted(set(losses) & set(ref_losses))
        dloss = max(abs(losses[s] - ref_losses[s]) for s in common)
        ms = find(f"{out}/train_{n}gpu.txt", r"train_end .*step_avg ([\d.]+)ms")
        ev = f"{out}/eval_{n}gpu.txt"
        sliding = find(ev, r"^final sliding val_loss \S+ val_bpb ([\d.]+)")
        ttt = find(ev, r"^final ttt val_loss \S+ val_bpb ([\d.]+)")
        scores = np.load(f"{out}/scores_{n}gpu.npy")
        dnll = float(np.abs(scores - ref_scores).max()) if scores.shape == ref_scores.shape else float("nan")
        print(f"{n:>4} {len(common):>5} {dloss:>11.5f} {ms:>8.1f} {ref_ms * base / (n * ms):>11.2f} "
              f"{sliding:>11.6f} {ttt:>10.6f} {abs(ttt - ref_ttt):>8.1e} {scores.size:>9} {dnll:>10.2e}")


if __name__ == "__main__":
    main()
