#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The anchor for bench/gpu/gpu_encode_bench: the same encoder and the same skewed stream in PyTorch,
batch size found by accelerate's find_executable_batch_size (start at 256, x0.9 on OOM, remembered
across calls, never grown back), under the same memory cap (torch.cuda.set_per_process_memory_fraction).

    accelerate_baseline.py [--calls 200] [--layers 4] [--d-model 512] [--heads 8] [--fraction 0.25]
                           [--seed 24301] [--out PATH]

Prints JSON (and writes it to --out). Needs a CUDA device, torch and accelerate; exits 0 with a
message otherwise.
"""
import argparse
import datetime
import json
import sys
import time

MASK = (1 << 64) - 1


class SplitMix64:
    """The same generator as bench/cost_model.hpp and gpu_encode_bench.cpp."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def between(self, lo, hi):
        return lo + self.next() % (hi - lo + 1)


def make_stream(calls, seed, min_call=64, max_call=256, short_min=16, short_max=128, long_percent=5, long_factor=10):
    rng = SplitMix64(seed)
    lengths, call_begin = [], [0]
    for _ in range(calls):
        for _ in range(rng.between(min_call, max_call)):
            length = rng.between(short_min, short_max)
            if rng.between(1, 100) <= long_percent:
                length *= long_factor
            lengths.append(length)
        call_begin.append(len(lengths))
    return lengths, call_begin


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0x5EED)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--out")
    a = p.parse_args()

    try:
        import torch
        from accelerate.utils import find_executable_batch_size
    except ImportError as e:
        print(f"accelerate_baseline: skipped: {e}")
        return 0
    if not torch.cuda.is_available():
        print("accelerate_baseline: skipped: no CUDA device visible")
        return 0

    device = torch.device("cuda", 0)
    torch.cuda.set_per_process_memory_fraction(a.fraction, 0)
    torch.manual_seed(1)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(a.vocab, a.d_model)
            layer = torch.nn.TransformerEncoderLayer(a.d_model, a.heads)  # same defaults as LibTorch's
            self.encoder = torch.nn.TransformerEncoder(layer, a.layers)

        def forward(self, tokens, padding):
            x = self.embed(tokens).transpose(0, 1)
            x = self.encoder(x, src_key_padding_mask=padding).transpose(0, 1)
            keep = (~padding).unsqueeze(-1).to(x.dtype)
            return (x * keep).sum(1) / keep.sum(1).clamp_min(1)

    model = Encoder().to(device).eval()
    lengths, call_begin = make_stream(a.calls, a.seed)
    batches = 0
    ooms = 0

    def run_batch(first, last):
        nonlocal batches
        n = last - first
        ls = torch.tensor(lengths[first:last], device=device)
        longest = int(max(lengths[first:last]))
        padding = torch.arange(longest, device=device).unsqueeze(0) >= ls.unsqueeze(1)
        tokens = torch.randint(1, a.vocab, (n, longest), device=device)
        batches += 1
        with torch.no_grad():
            return model(tokens, padding).cpu()

    sizes = []

    @find_executable_batch_size(starting_batch_size=256)
    def encode_call(batch_size, first, last):
        nonlocal ooms
        sizes.append(batch_size)
        try:
            out = []
            for pos in range(first, last, batch_size):
                out.append(run_batch(pos, min(last, pos + batch_size)))
            return out
        except torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else RuntimeError:
            ooms += 1
            raise

    run_batch(0, 8)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for c in range(len(call_begin) - 1):
        encode_call(call_begin[c], call_begin[c + 1])
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "bench": "accelerate_baseline",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "memory_fraction": a.fraction,
        "model": {"layers": a.layers, "d_model": a.d_model, "heads": a.heads},
        "calls": a.calls,
        "results": [{
            "policy": "accelerate-find-executable-batch-size",
            "items_per_s": len(lengths) / seconds,
            "ooms": ooms,
            "batches": batches,
            "seconds": seconds,
            "note": f"final batch size {sizes[-1] if sizes else 0}",
        }],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
