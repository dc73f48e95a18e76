"""bench/compression.py: the artifact's bytes and times per coder, on the entries of one artifact: train_gpt's format
(the int6/int7 codes in one rANS stream with a Categorical model per tensor from its histogram, constriction's
AnsCoder; scales, fp16/fp32 tensors and the JSON header as one zstd-22 frame), against the previous format, zstd-22 of
everything (PGOLF-INT-2), and the codes' order-0 entropy per tensor (the bound for any coder of each tensor's
histogram). Reads either format; --write converts an artifact to train_gpt's (e.g. an older run's, for
bench/project_8gpu.py --artifact).

    python3 bench/compression.py ARTIFACT [--write NEW.ptz] [--skip-zstd]"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

OLD_MAGIC = b"PGOLF-INT-2\n"  # zstd-22 of: magic, raw arrays grouped by kind, JSON header, its 8-byte length


def old_serialize(config: dict, entries: dict) -> bytes:
    """The previous format before zstd: raw arrays by kind (int6 codes, int7 codes, their scales, fp16, fp32)."""
    header, parts, offset = {"config": config, "tensors": []}, [], 0
    order = [(k, f) for f in ("q", "scale") for k in tg.INT_KINDS.values()] + [("fp16", "data"), ("fp32", "data")]
    for kind, field in order:
        for name, e in ((n, e) for n, e in entries.items() if e["kind"] == kind):
            arr = e[field].detach().cpu().contiguous().numpy()
            header["tensors"].append({"name": name, "kind": kind, "field": field, "dtype": str(arr.dtype),
                                      "shape": list(arr.shape), "offset": offset})
            parts.append(arr.tobytes())
            offset += arr.nbytes
    head = json.dumps(header).encode()
    return OLD_MAGIC + b"".join(parts) + head + len(head).to_bytes(8, "little")


def old_unpack(blob: bytes) -> tuple[dict, dict]:
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 31)
    assert raw.startswith(OLD_MAGIC), "neither train_gpt's artifact format nor the previous one"
    head_len = int.from_bytes(raw[-8:], "little")
    header, payload = json.loads(raw[-8 - head_len : -8]), memoryview(raw)[len(OLD_MAGIC) : -8 - head_len]
    entries: dict = {}
    for t in header["tensors"]:
        arr = np.frombuffer(payload, np.dtype(t["dtype"]), int(np.prod(t["shape"])), t["offset"])
        entry = entries.setdefault(t["name"], {"kind": t["kind"]})
        entry[t["field"]] = torch.from_numpy(arr.reshape(t["shape"]).copy())
    return header["config"], entries


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--write", default="", help="write the entries in train_gpt's format to this path")
    ap.add_argument("--skip-zstd", action="store_true", help="skip zstd-22 of everything (~1 min on CPU)")
    a = ap.parse_args()
    blob = open(a.artifact, "rb").read()
    current = blob.startswith(tg.ARTIFACT_MAGIC)
    config, entries = tg.unpack_artifact(blob, a.artifact) if current else old_unpack(blob)
    codes = [e["q"] for e in entries.values() if e["kind"] in tg.INT_KINDS.values()]
    print(f"{a.artifact}: {len(blob):,} bytes, {'train_gpt' if current else 'the previous (zstd-22)'} format; "
          f"{sum(q.numel() for q in codes):,} codes in {len(codes)} tensors")
    new, pack_s = timed(lambda: tg.pack_artifact(config, entries))
    (config2, entries2), unpack_s = timed(lambda: tg.unpack_artifact(new))
    assert config2 == config and all(torch.equal(entries2[n][f], t) for n, e in entries.items()
                                     for f, t in e.items() if f != "kind"), "round trip is not bit-exact"
    words = 4 * int.from_bytes(new[len(tg.ARTIFACT_MAGIC) : len(tg.ARTIFACT_MAGIC) + 8], "little")
    bits = 0.0
    for q in codes:
        p = torch.unique(q, return_counts=True)[1].double() / q.numel()
        bits -= float((p * p.log2()).sum()) * q.numel()
    print(f"order-0 entropy of the codes, per tensor: {bits / 8:,.0f} bytes")
    print(f"train_gpt (rANS codes + zstd-22 rest): {len(new):,} bytes (rANS words {words:,}, "
          f"{words - bits / 8:+,.0f} over the entropy; rest {len(new) - words - len(tg.ARTIFACT_MAGIC) - 12:,}); "
          f"pack {pack_s:.2f} s, unpack {unpack_s:.2f} s")
    if not a.skip_zstd:
        old, old_s = timed(lambda: zstandard.ZstdCompressor(level=22).compress(old_serialize(config, entries)))
        _, old_unpack_s = timed(lambda: old_unpack(old))
        print(f"previous (zstd-22 of everything): {len(old):,} bytes, pack {old_s:.1f} s, unpack {old_unpack_s:.2f} s; "
              f"train_gpt's is {len(new) - len(old):+,} bytes")
    if a.write:
        tg.atomic_write(a.write, new)
        print(f"wrote {a.write}")


if __name__ == "__main__":
    main()
