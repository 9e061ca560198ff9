"""``vlm eval tokenizer``: how well a DualToken tokenizer reconstructs images and keeps the semantics.

    vlm eval tokenizer --model runs/tokenizer_demo/final --images demo_data/val/val-{000000..000001}.tar
    vlm eval tokenizer --model TOK_DIR --images VAL_SHARDS --dual-encoder runs/vit_dual/final   # + retention

Reconstruction: ``decode(encode(x))`` against ``x`` in [0, 1] (the tokenizer's ``to_unit``), PSNR and SSIM
from torchmetrics (``peak_signal_noise_ratio`` / ``structural_similarity_index_measure``, data range 1,
averaged over images); codebook usage (share of codes used at least once over the whole set) and
perplexity per branch (:func:`vlm.quant.codebook_stats` over all positions and depths).

Semantic retention (``--dual-encoder DIR``, a dual encoder whose image tower is the tokenizer's backbone,
i.e. its teacher): Babel-ImageNet zero-shot (:func:`vlm.eval.zeroshot.evaluate_zeroshot`, the same labels,
translated prompts and text embeddings for both) with the dual encoder's own image tower (unquantised)
and with the quantised semantic path (:class:`vlm.towers.dualtoken.SemanticTower`) in its place, per
language; retention = quantised top-1 / teacher top-1. A dual encoder whose image tower is not the
tokenizer's teacher is reported with a warning (retention is then not a like-for-like comparison).

Report (``eval/report.py``): JSON + Markdown + PNG (per-language bars) and ``{name}_grid.png``: originals
(top row) over reconstructions (bottom row).
"""
from __future__ import annotations

import argparse

import torch

from vlm.errors import DataError, UserError


def add_arguments(sub) -> None:
    p = sub.add_parser("tokenizer", help="DualToken tokenizer: PSNR/SSIM, codebook usage, semantic retention")
    p.add_argument("--model", required=True, help="tokenizer directory (vlm train task: tokenizer -> run/final)")
    p.add_argument("--images", required=True, help="image shards (path, glob, brace range, '::' list)")
    p.add_argument("--dual-encoder", default=None, help="dual encoder whose image tower is the tokenizer's teacher: "
                                                        "adds zero-shot retention per language")
    p.add_argument("--labels", default=None, help="labels file (default: labels.json beside the images)")
    p.add_argument("--prompts", default=None, help="prompts file (default: prompts.json beside the labels)")
    p.add_argument("--langs", default="all", help="comma-separated language codes (default: all)")
    p.add_argument("--max-images", type=int, default=None, help="only the first N images")
    p.add_argument("--grid", type=int, default=8, help="images in the reconstruction grid PNG (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="image loader workers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="eval_out", help="report directory (default ./eval_out)")
    p.add_argument("--name", default=None, help="report file name without extension (default tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="let an hf: backbone directory run its code")


def _batches(spec: str, preprocess, args):
    from vlm.eval.shards import ordered_stream

    stream = ordered_stream(spec, preprocess, task="image", batch_size=args.batch_size, num_workers=args.workers)
    seen = 0
    for b in stream:
        if args.max_images is not None and seen >= args.max_images:
            break
        if args.max_images is not None and seen + b["pixels"].shape[0] > args.max_images:
            n = args.max_images - seen
            b = {k: (v[:n] if hasattr(v, "__len__") and len(v) == b["pixels"].shape[0] else v) for k, v in b.items()}
        seen += b["pixels"].shape[0]
        yield b


@torch.no_grad()
def reconstruction(tok, batches, device="cpu", grid: int = 8) -> tuple[dict, dict, torch.Tensor | None]:
    """(metrics {psnr, ssim, n_images}, codes {branch: usage, perplexity}, grid images [2, g, 3, H, W] in
    [0, 1] or None) over ``batches`` of uint8 pixels."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from vlm.quant import codebook_stats

    tok = tok.to(device).eval()
    psnr = ssim = 0.0
    n, codes, shown = 0, {"pixel": [], "semantic": []}, None
    for b in batches:
        x = tok.preprocess.normalize(b["pixels"].to(device))
        c = tok.encode(x)
        real, fake = tok.to_unit(x), tok.to_unit(tok.decode(c.pixel))
        m = x.shape[0]
        psnr += m * float(peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="elementwise_mean",
                                                   dim=(1, 2, 3)))
        ssim += m * float(structural_similarity_index_measure(fake, real, data_range=1.0))
        n += m
        codes["pixel"].append(c.pixel.flatten().cpu())
        codes["semantic"].append(c.semantic.flatten().cpu())
        if shown is None:
            shown = torch.stack([real[:grid].cpu(), fake[:grid].cpu()])
    if n == 0:
        raise DataError("the image shards gave no image to reconstruct")
    stats = {}
    for branch, cs in codes.items():
        usage, ppl = codebook_stats(torch.cat(cs), tok.codebook_size)
        stats[branch] = {"usage": float(usage), "perplexity": float(ppl)}
    return {"psnr": psnr / n, "ssim": ssim / n, "n_images": n}, stats, shown


def save_grid(images: torch.Tensor, path: str) -> str:
    """``[rows, g, 3, H, W]`` in [0, 1] -> one PNG, rows stacked (atomic write)."""
    import io

    from PIL import Image

    from vlm.eval.report import _atomic_write

    rows = [torch.cat(list(r), dim=-1) for r in images]  # [3, H, g*W]
    img = (torch.cat(rows, dim=-2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    _atomic_write(path, buf.getvalue())
    return path


def retention(tok, dual_dir: str, args) -> tuple[dict, list[str]]:
    """Zero-shot per language with the dual encoder's image tower and with the tokenizer's quantised
    semantic path in its place -> ({lang: {top1_teacher, top1_quantised, retention}}, warnings)."""
    from vlm.eval.babel import default_labels_path, load_labels, load_prompts, resolve_langs
    from vlm.eval.cli import _default_prompts, _langs, load_model
    from vlm.eval.zeroshot import embed_images, evaluate_zeroshot, make_text_encoder
    from vlm.towers.dualtoken import SemanticTower

    labels = load_labels(default_labels_path(args.labels, args.images))
    langs = resolve_langs(_langs(args.langs), labels)
    prompts = load_prompts(args.prompts or _default_prompts(labels.path))
    de = load_model(dual_dir, args.device, trust_remote_code=args.trust_remote_code)
    if not hasattr(de, "image_tower"):
        raise UserError(f"--dual-encoder {dual_dir} is not a dual encoder (no image tower)")
    warnings = []
    t_sd, d_sd = tok.teacher.tower.state_dict(), de.image_tower.state_dict()
    if t_sd.keys() != d_sd.keys() or any(not torch.equal(t_sd[k].cpu(), d_sd[k].cpu()) for k in t_sd):
        warnings.append("the dual encoder's image tower is not the tokenizer's teacher: retention compares "
                        "different towers")
    wanted = {c for lang in langs for c in labels.classes[lang]}
    encode_texts = make_text_encoder(de, args.device)
    out = {}
    for name in ("teacher", "quantised"):
        if name == "quantised":
            de.image_tower = SemanticTower(tok).to(args.device).eval()
        emb, cls, _ = embed_images(de, _batches(args.images, de.image_preprocess, args), args.device,
                                   keep_classes=wanted)
        res = evaluate_zeroshot(emb, cls, labels, prompts, "translated", encode_texts, langs=langs)
        for lang, row in res["per_language"].items():
            out.setdefault(lang, {})[f"top1_{name}"] = row.get("top1")
    for row in out.values():
        t, q = row.get("top1_teacher"), row.get("top1_quantised")
        row["retention"] = (q / t) if t else None
    return out, warnings


def run_tokenizer(args) -> int:
    import os

    from vlm import registry
    from vlm.eval.report import write_report

    for flag in ("max_images", "grid", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not os.path.isfile(os.path.join(args.model, "dualtoken.json")):
        raise DataError(f"--model {args.model}: no dualtoken.json there; give a tokenizer directory "
                        f"(run_dir/final of vlm train task: tokenizer)")
    if args.dual_encoder and not os.path.isdir(args.dual_encoder):
        raise DataError(f"--dual-encoder {args.dual_encoder}: folder not found")
    tok = registry.build("tower", f"dualtoken:{args.model}", trust_remote_code=args.trust_remote_code)
    metrics, codes, shown = reconstruction(tok, _batches(args.images, tok.preprocess, args), args.device, args.grid)
    per_lang, warnings = {}, []
    if args.dual_encoder:
        per_lang, warnings = retention(tok, args.dual_encoder, args)
        vals = [r["retention"] for r in per_lang.values() if r.get("retention") is not None]
        metrics["mean_retention"] = sum(vals) / len(vals) if vals else None
        for k in ("top1_teacher", "top1_quantised"):
            v = [r[k] for r in per_lang.values() if r.get(k) is not None]
            metrics[f"mean_{k}"] = sum(v) / len(v) if v else None
    for branch, s in codes.items():
        metrics[f"{branch}_usage"], metrics[f"{branch}_perplexity"] = s["usage"], s["perplexity"]
    # report protocol (eval.report): "metrics" names the per-language columns, "summary" holds the numbers
    results = {"task": "tokenizer", "primary_metric": "retention" if per_lang else "psnr",
               "metrics": ["top1_teacher", "top1_quantised", "retention"] if per_lang else [],
               "summary": metrics, "overall": [k for k in metrics if not k.startswith("mean_")],
               "per_language": per_lang, "codebooks": codes, "warnings": warnings,
               "tokenizer": {"mode": tok.mode, "codebook_size": tok.codebook_size, "depth": tok.depth,
                             "grid": list(tok.grid)}}
    name = args.name or "tokenizer"
    paths = write_report(results, args.out, name, {"command": "vlm eval tokenizer", "model": args.model,
                                                   "images": args.images, "dual_encoder": args.dual_encoder})
    if shown is not None:
        paths["grid"] = save_grid(shown, os.path.join(args.out, f"{name}_grid.png"))
    print(f"PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  pixel usage {metrics['pixel_usage']:.3f} "
          f"semantic usage {metrics['semantic_usage']:.3f}" +
          (f"  retention {metrics['mean_retention']:.3f}" if metrics.get("mean_retention") is not None else ""))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0
