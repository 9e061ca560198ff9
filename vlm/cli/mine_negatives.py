"""``vlm mine-negatives``: self-aware hard-negative clusters from a model's own embeddings (Gen2Embed).

    vlm mine-negatives --model runs/embed_demo/final --shards 'demo_data/train/*.tar'
        [--out demo_data/train/clusters.jsonl] [--k 15 --m 3 --dup-threshold 0.95 --lang any]
    vlm train embed_demo data.clusters=demo_data/train/clusters.jsonl

Every sample of the shards is read once through the evaluation reader (``eval.shards.ordered_stream``:
the loader's pipeline, in order, bad samples skipped and counted); its image is embedded with
``encode_image`` and one of its captions (``--lang``: that language's first caption, or ``any``: a language
drawn from (seed, key)) with the model's text encoder (``eval.zeroshot.make_text_encoder``: the same
prompts ``vlm eval`` uses). Any model ``vlm.model.load_model`` reads works: an embedder, a vision-LLM
directory, a dual encoder. The mining is :func:`vlm.embedder.mining.mine_clusters`; the clusters are
written next to the shards (default ``<first shard's folder>/clusters.jsonl``) with ``.meta.json``.
"""
from __future__ import annotations

import argparse
import os
import random

from vlm.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="embedder / vision-LLM / dual encoder directory")
    parser.add_argument("--shards", required=True, help="the training shards (path, glob, brace range, '::' list)")
    parser.add_argument("--out", default=None, help="clusters JSONL (default: clusters.jsonl beside the shards)")
    parser.add_argument("--k", type=int, default=15, help="hard owners per query (default 15)")
    parser.add_argument("--m", type=int, default=3, help="candidate multiplier: 2*K*m retrieved (default 3)")
    parser.add_argument("--dup-threshold", type=float, default=0.95,
                        help="cosine at or above which an owner is a near-duplicate of the query (default 0.95)")
    parser.add_argument("--lang", default="any", help="caption language of the queries, or 'any' (default)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="loader workers (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="order of the greedy pass and 'any' languages")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_args(args) -> None:
    from vlm.data.shards import expand_shards
    from vlm.errors import DataError

    for flag, low in (("k", 1), ("m", 1), ("batch_size", 1), ("workers", 0)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if not (0.0 < args.dup_threshold <= 1.0):
        raise UserError(f"--dup-threshold must be in (0, 1], got {args.dup_threshold}")
    if not os.path.isdir(args.model):
        raise DataError(f"--model {args.model}: no such model directory")
    if args.lang != "any":
        from vlm.data.langs import normalize_lang

        args.lang = normalize_lang(args.lang)
    try:
        return expand_shards(args.shards)
    except DataError as e:
        raise DataError(f"--shards: {e}") from None


def run(args) -> int:
    urls = check_args(args)
    import torch

    from vlm.data.prompts import stable_seed
    from vlm.embedder.mining import mine_clusters, write_clusters
    from vlm.errors import DataError
    from vlm.eval.cli import check_device, load_model
    from vlm.eval.retrieval import captions_of
    from vlm.eval.shards import ordered_stream
    from vlm.eval.zeroshot import embed_images, make_text_encoder

    check_device(args.device)
    model = load_model(args.model, args.device)
    stream = ordered_stream(urls, model.image_preprocess, task="image", batch_size=args.batch_size,
                            num_workers=args.workers)
    captions: dict = {}
    shard_of: dict = {}

    def tagged(batches):
        for b in captions_of(batches, captions):
            shard_of.update(zip(b["key"], b["url"]))
            yield b

    img, _, keys = embed_images(model, tagged(stream), args.device, not args.no_progress)
    rows, texts = [], []
    for i, key in enumerate(keys):
        caps = {lg: c for lg, c in (captions.get(key) or {}).items() if c}
        if args.lang != "any":
            caps = {args.lang: caps[args.lang]} if args.lang in caps else {}
        if not caps:
            continue
        lang = sorted(caps)[random.Random(stable_seed(args.seed, "mine", key)).randrange(len(caps))]
        rows.append(i)
        texts.append(caps[lang][0])
    if len(rows) < args.k + 1:
        raise DataError(f"{len(rows)} samples with a caption{'' if args.lang == 'any' else ' in ' + args.lang} in "
                        f"{args.shards}: mining K={args.k} owners needs more than K samples")
    enc = make_text_encoder(model, args.device)
    txt = torch.cat([enc(texts[s:s + 256]) for s in range(0, len(texts), 256)])
    clusters = mine_clusters(txt, img[torch.tensor(rows)], k=args.k, m=args.m, dup_threshold=args.dup_threshold,
                             seed=args.seed)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(urls[0])), "clusters.jsonl")
    ks = [keys[i] for i in rows]
    path = write_clusters(out, clusters, ks, [shard_of[k] for k in ks], {
        "model": os.path.abspath(args.model), "shards": args.shards, "k": args.k, "m": args.m,
        "dup_threshold": args.dup_threshold, "lang": args.lang, "seed": args.seed,
        "skipped": dict(getattr(stream, "skipped", {}) or {})})
    n_hard = sum(c["hard"] for c in clusters)
    print(f"{len(rows)} queries -> {len(clusters)} clusters of up to {args.k + 1} ({n_hard} hard, "
          f"{len(clusters) - n_hard} of leftovers): {path}")
    return 0
