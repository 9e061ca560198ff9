"""Residual VQ: ``vlm.quant.ResidualVQ`` against vector-quantize-pytorch's ``ResidualVQ`` on the same work,
and the DualToken tokenizer's encode / decode images/s.

    pip install -e ".[bench]" && python bench/bench_quantizer.py [--repeats 5] [--threads 1]

Same sizes for both quantisers: N latent vectors of dim 32 (a 16x16 grid x batch), one codebook shared
across depths (``shared_codebook=True``), EMA decay 0.99, Laplace eps 1e-5, dead-code threshold 1,
commitment loss, training mode (assignment + EMA update + straight-through), forward + backward of
``out.sum() + commit``. Runs are interleaved (ours, theirs, ours, ...) after a warm-up; the table gives the
median and the spread (min-max) of the per-call time and the ratio theirs / ours of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def quantizer_rows(sizes, repeats: int):
    from vector_quantize_pytorch import ResidualVQ as LibRVQ

    from vlm.quant import ResidualVQ

    rows = []
    for n, k, depth in sizes:
        torch.manual_seed(0)
        ours = ResidualVQ(32, k, depth, decay=0.99, eps=1e-5, dead_threshold=1.0).train()
        lib = LibRVQ(dim=32, num_quantizers=depth, codebook_size=k, shared_codebook=True, decay=0.99, eps=1e-5,
                     threshold_ema_dead_code=1, kmeans_init=False, commitment_weight=1.0).train()
        z = torch.randn(1, n, 32, requires_grad=True)

        def run_ours():
            out, _, aux = ours(z)
            (out.sum() + aux["commit_loss"]).backward()

        def run_lib():
            out, _, commit = lib(z)
            (out.sum() + commit.sum()).backward()

        for f in (run_ours, run_lib):  # warm-up (also initialises both codebooks)
            f()
        t_o, t_l = [], []
        for _ in range(repeats):
            t_o += _time(run_ours, 1)
            t_l += _time(run_lib, 1)
        rows.append((f"N={n} K={k} depth={depth}", t_o, t_l))
    return rows


def tokenizer_rows(repeats: int, batch: int = 16):
    from vlm import registry

    torch.manual_seed(0)
    tok = registry.build("tower", "dualtoken:tiny:vit", backbone_cfg=dict(width=64, depth=4, image_size=32,
                                                                          patch_size=4),
                         codebook_size=256, depth=2, code_dim=16, decoder_channels=64).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        codes = tok.encode(x)
        enc = _time(lambda: tok.encode(x), repeats)
        dec = _time(lambda: tok.decode(codes.pixel), repeats)
    return [("encode", [batch / t for t in enc]), ("decode", [batch / t for t in dec])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved repeats\n")
    print("| size | vlm.quant ms (median, min-max) | vector-quantize-pytorch ms | ratio lib/ours |")
    print("|---|---|---|---|")
    for name, t_o, t_l in quantizer_rows([(4096, 1024, 4), (8192, 4096, 4), (8192, 16384, 4)], args.repeats):
        mo, ml = statistics.median(t_o), statistics.median(t_l)
        print(f"| {name} | {1e3 * mo:.1f} ({1e3 * min(t_o):.1f}-{1e3 * max(t_o):.1f}) | {1e3 * ml:.1f} "
              f"({1e3 * min(t_l):.1f}-{1e3 * max(t_l):.1f}) | {ml / mo:.2f}x |")
    print("\n| tokenizer (dualtoken:tiny:vit, 32 px, batch 16) | images/s (median, min-max) |")
    print("|---|---|")
    for name, ips in tokenizer_rows(args.repeats):
        print(f"| {name} | {statistics.median(ips):.0f} ({min(ips):.0f}-{max(ips):.0f}) |")


if __name__ == "__main__":
    main()
