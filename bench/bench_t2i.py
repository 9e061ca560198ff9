"""Text-to-image generation speed: images/s with the LLM's KV cache against recomputing the sequence.

    python bench/bench_t2i.py [--quick] [--json out.json] [--batch 8] [--rounds 5]

Both sides run :meth:`vlm.vision_llm.t2i.TextToImage.generate` on the same model, prompts and greedy
decoding (so both produce the same codes -- checked -- and the same images): ``use_cache=True`` feeds one new
image position per step through a ``transformers.DynamicCache``; ``use_cache=False`` runs the whole
sequence (prompt + all image positions so far) again each step, the way a model without a cache must. The
model is the demo's shape: a tokenizer with an 8x8 grid (64 image positions, depth 2 per branch), a
2-layer 96-wide Llama, random weights (speed does not depend on training). Rounds are interleaved ABBA
(``bench/common.py``); the row is the median ratio cached/uncached of images/s with its spread; a second
row does the same with classifier-free guidance (scale 3: the unconditional rows run in the same batch).
``--plot-dir DIR`` draws ``t2i.png``: greedy generate time and traced allocator peak against the image positions.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import Report, add_protocol_args, growth_point, interleave, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1


def build_model(grid_patch: int = 4):
    from vlm.vision_llm.t2i import T2IConfig, TextToImage

    torch.manual_seed(0)
    cfg = T2IConfig(tower="dualtoken:tiny:vit",
                    tower_cfg=dict(backbone_cfg=dict(width=64, depth=4, image_size=32, patch_size=grid_patch),
                                   pixel_block=1, shortcut_block=1, semantic_block=3, code_dim=16, codebook_size=256,
                                   depth=2, decoder_channels=64),
                    llm="tiny:llama", llm_cfg=dict(hidden_size=96, num_layers=2, num_heads=4),
                    trainable={"llm": "full"}, head_width=96, head_layers=2)
    return TextToImage(cfg).eval()


def growth_series(grid_patches, prompts: list[str], sampling, rounds: int) -> dict[str, tuple[list, list, list]]:
    """``plot_growth``'s series of ``generate`` against the image positions (one model per patch size of the
    32 px grid): per side the median seconds of ``rounds`` interleaved rounds and the traced allocator peak."""
    series: dict = {}
    for patch in grid_patches:
        model = build_model(patch)
        growth_point(series, model.num_tokens, {
            side: lambda c=c: model.generate(prompts, "en", sampling=sampling, use_cache=c)
            for side, c in (("KV cache", True), ("no cache (recompute)", False))}, rounds)
    return series


def main(argv=None) -> int:
    from vlm.vision_llm.t2i_heads import Sampling

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per generate call")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per side (ABBA)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2-core machine is shared)")
    add_protocol_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batch = 3, 4
    torch.set_num_threads(args.threads)
    report = Report(__file__, "transformers")
    model = build_model()
    prompts = [f"a red circle number {i}" for i in range(args.batch)]
    for case, guidance in (("greedy", 0.0), ("greedy + guidance 3", 3.0)):
        s = Sampling(temperature=0, guidance=guidance)
        a = model.generate_codes(prompts, "en", sampling=s, use_cache=True)
        b = model.generate_codes(prompts, "en", sampling=s, use_cache=False)
        if not all(torch.equal(a[k], b[k]) for k in a):
            raise SystemExit(f"{case}: cached and uncached generation gave different codes")

        def rate(cache: bool, s=s) -> float:
            t = time.perf_counter()
            model.generate(prompts, "en", sampling=s, use_cache=cache)
            return len(prompts) / (time.perf_counter() - t)

        res = interleave({"cache": lambda: rate(True), "no_cache": lambda: rate(False)}, args.rounds, warmup=1)
        report.add(ratio_row("t2i", f"generate {model.num_tokens} positions, batch {args.batch}, {case}",
                             res["cache"], res["no_cache"], unit="images/s", higher_is_better=True,
                             peer_name="no KV cache (recompute)", metric="images/s",
                             note="same model, prompts and codes; ratio = with cache / without"))
    if args.plot_dir:
        patches = (16, 8, 4) if args.quick else (16, 8, 4, 2)
        series = growth_series(patches, prompts, Sampling(temperature=0), args.rounds)
        report.plot(args.plot_dir, "t2i.png", f"t2i generate against image positions "
                    f"(batch {args.batch} fixed), greedy, {args.threads} thread(s)", "image positions", series)
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
