"""Residual VQ: ``vlm.quant.ResidualVQ`` against vector-quantize-pytorch's ``ResidualVQ`` on the same work,
and the DualToken tokenizer's encode / decode images/s.

    pip install -e ".[bench]" && python bench/bench_quantizer.py [--quick] [--json out.json] [--repeats 5]

Same sizes for both quantisers: N latent vectors of dim 32 (a 16x16 grid x batch), one codebook shared
across depths (``shared_codebook=True``), EMA decay 0.99, Laplace eps 1e-5, dead-code threshold 1,
commitment loss, training mode (assignment + EMA update + straight-through), forward + backward of
``out.sum() + commit``. Runs are interleaved ABBA after a warm-up (``bench/common.py``, the protocol
``bench/run_all.py`` collects); each row is the median of the per-round ratios theirs / ours of the time with
its spread. The tokenizer's encode / decode images/s are rows without a peer (no library has this tokenizer).
``--plot-dir DIR`` draws ``quantizer.png``: train-step time and traced allocator peak against N, both quantisers.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import Report, add_protocol_args, growth_point, info_row, interleave, ratio_row, timed  # noqa: E402

BENCH_PROTOCOL = 1


def train_steps(n: int, k: int, depth: int):
    """(ours, vector-quantize-pytorch's) train step on the same N x 32 latents: forward + backward of
    ``out.sum() + commit``."""
    from vector_quantize_pytorch import ResidualVQ as LibRVQ

    from vlm.quant import ResidualVQ

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

    return run_ours, run_lib


def quantizer_rows(sizes, repeats: int):
    rows = []
    for n, k, depth in sizes:
        run_ours, run_lib = train_steps(n, k, depth)
        res = interleave({"ours": timed(run_ours), "lib": timed(run_lib)}, repeats, warmup=1)
        rows.append((f"N={n} K={k} depth={depth}", res["ours"], res["lib"]))
    return rows


def growth_series(ns, k: int, depth: int, repeats: int) -> dict[str, tuple[list, list, list]]:
    """``plot_growth``'s series of the train step against N: per side the median seconds of ``repeats``
    interleaved rounds and the traced allocator peak (MiB) of one step."""
    series: dict = {}
    for n in ns:
        growth_point(series, n, dict(zip(("vlm ResidualVQ", "vector-quantize-pytorch ResidualVQ"),
                                         train_steps(n, k, depth))), repeats)
    return series


def tokenizer_rows(repeats: int, batch: int = 16):
    from vlm import registry

    torch.manual_seed(0)
    tok = registry.build("tower", "dualtoken:tiny:vit", backbone_cfg=dict(width=64, depth=4, image_size=32,
                                                                          patch_size=4),
                         codebook_size=256, depth=2, code_dim=16, decoder_channels=64).eval()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        codes = tok.encode(x)
        enc = [timed(lambda: tok.encode(x))() for _ in range(repeats)]
        dec = [timed(lambda: tok.decode(codes.pixel))() for _ in range(repeats)]
    return [("encode", [batch / t for t in enc]), ("decode", [batch / t for t in dec])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per side")
    ap.add_argument("--threads", type=int, default=1)
    add_protocol_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [(4096, 1024, 4), (8192, 4096, 4), (8192, 16384, 4)]
    if args.quick:
        args.repeats, sizes = 3, sizes[:2]
    report = Report(__file__, "vector-quantize-pytorch")
    for name, t_o, t_l in quantizer_rows(sizes, args.repeats):
        report.add(ratio_row("quantizer", f"residual VQ train step {name}, dim 32, {args.threads} thread(s)", t_o,
                             t_l, unit="s", higher_is_better=False, peer_name="vector-quantize-pytorch ResidualVQ",
                             peer_version=report.env["versions"]["vector-quantize-pytorch"], metric="time",
                             note="forward + backward, EMA update, shared codebook"))
    for name, ips in tokenizer_rows(args.repeats):
        report.add(info_row("quantizer", f"dualtoken:tiny:vit {name}, 32 px, batch 16", ips, unit="images/s"))
    if args.plot_dir:
        k, depth = sizes[0][1:]
        ns = (1024, 2048, 4096, 8192)
        report.plot(args.plot_dir, "quantizer.png", f"residual VQ train step (fwd+bwd), K={k}, "
                    f"depth {depth}, dim 32, {args.threads} thread(s)", "N (latent vectors)",
                    growth_series(ns, k, depth, 2 if args.quick else args.repeats))
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
