"""bench/lora_compile.py: what compiling the LoRA TTT graph costs, per block ("regional" compilation, as
train_gpt.evaluate_ttt does: compiled_blocks, PyTorch's recipe for repeated layers,
https://docs.pytorch.org/tutorials/recipes/regional_compilation.html) against the whole model (torch.compile of the
GPT, as the file did before). The 8xH100 projection of code 0510a131 spent 67 s of 423 s compiling that graph whole.

Each mode runs train_gpt.evaluate_ttt itself, in its own process with an empty Inductor cache (a fresh contest
machine), on the first --tokens validation tokens, and prints: seconds before the first step (set-up + compile +
warm-up), ms per step after it, graphs compiled, and the pass's val_loss (the modes must agree up to bf16 noise).

    DATA_PATH=data/bench_sp1024 python3 bench/lora_compile.py [--artifact final_model.int6.ptz] [--tokens 400000]
    (model settings from the artifact, else the defaults or the environment's, randomly initialised)"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

MODES = ("blocks", "model")


@contextlib.contextmanager
def whole_compile(model: tg.GPT, device: torch.device):
    """The whole GPT compiled (static shapes) in place of train_gpt's compiled_blocks."""
    yield torch.compile(model, dynamic=False)


def run_mode(mode: str, artifact: str, n_tokens: int, force: bool) -> dict:
    """evaluate_ttt on this process's device with `mode`'s compilation; returns the timings as a dict."""
    args, _ = tg.Hyperparameters.from_env()
    rt = tg.init_runtime()  # one process: cuda:0 with a run's TF32 and Inductor settings, or the CPU
    device = rt.device
    if artifact:
        model, _ = tg.load_artifact_model(artifact, device)
    else:
        torch.manual_seed(0)
        model = tg.GPT(**tg.model_config(args, 1)).to(device)
    if device.type == "cuda" or force:  # on CPU without --force-compile both modes run eager
        tg.maybe_compile = lambda module, device: torch.compile(module, dynamic=False)
        if mode == "model":
            tg.compiled_blocks = whole_compile
    tokens = tg.load_validation_tokens(os.path.join(args.data_path, "fineweb_val_*.bin"), args.train_seq_len,
                                       args.vocab_size)[: n_tokens + 1].to(device)
    bytes_per_target = torch.ones(tokens.numel() - 1, dtype=torch.float64, device=device)
    lines = []
    t0 = time.perf_counter()
    loss, _, _ = tg.evaluate_ttt(model, tokens, bytes_per_target, args, rt, lines.append, math.inf)
    total = time.perf_counter() - t0
    words = lines[-1].split()
    steps, loop = int(words[words.index("steps") + 1]), float(words[words.index("time") + 1].rstrip("s"))
    return dict(mode=mode, device=str(device), before_first_step_s=round(total - loop, 1),
                ms_per_step=round(1000 * loop / max(steps, 1), 2), steps=steps,
                graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"], val_loss=round(loss, 6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="")
    ap.add_argument("--tokens", type=int, default=400_000, help="validation tokens to run (default 400,000)")
    ap.add_argument("--mode", choices=MODES, help="run one mode in this process (the driver's child)")
    ap.add_argument("--force-compile", action="store_true", help="compile on CPU too (a smoke test; slow)")
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.artifact, a.tokens, a.force_compile)))
        return
    for mode in MODES:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(a.tokens), "--artifact", a.artifact]
            out = subprocess.run(cmd + ["--force-compile"] * a.force_compile, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['mode']:6s} on {r['device']}: before the first step {r['before_first_step_s']:6.1f} s, "
                  f"{r['ms_per_step']:7.2f} ms/step over {r['steps']} steps, {r['graphs']} graphs, "
                  f"val_loss {r['val_loss']:.6f}")


if __name__ == "__main__":
    main()
