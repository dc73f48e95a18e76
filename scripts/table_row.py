#!/usr/bin/env python3
"""Print the README results-table row of a train_gpt.py log.

usage: python3 scripts/table_row.py [train_log.txt]
Columns: steps | ms/step | pre-quant bpb | round-trip bpb | sliding bpb | TTT bpb | artifact bytes | eval s
"""
import re
import sys


def field(text: str, pattern: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "—"


def main() -> None:
    text = open(sys.argv[1] if len(sys.argv) > 1 else "train_log.txt", encoding="utf-8").read()
    row = [
        field(text, r"train_end steps (\d+)"),
        field(text, r"train_end .*step_avg ([\d.]+)ms"),
        field(text, r"final pre_quant val_loss \S+ val_bpb ([\d.]+)"),
        field(text, r"final roundtrip val_loss \S+ val_bpb ([\d.]+)"),
        field(text, r"final sliding val_loss \S+ val_bpb ([\d.]+)"),
        field(text, r"final ttt val_loss \S+ val_bpb ([\d.]+)"),
        field(text, r"bytes_total (\d+) \(limit"),
        field(text, r"eval_seconds ([\d.]+)"),
    ]
    print("| steps | ms/step | pre-quant | round-trip | sliding s64 | after TTT | artifact bytes | eval s |")
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
