"""``vlm eval t2i``: does a text-to-image model draw the class it is asked for, in every prompt language?

    vlm eval t2i --model runs/t2i_demo/final --classifier runs/pretrain_demo/final \\
        --labels demo_data/labels.json --prompts demo_data/prompts.json --langs en,de,zh --per-class 4

For each language of the labels file (Babel-ImageNet format ``{LANG: [class ids, names]}``) and each of its
classes, ``--per-class`` prompts are written -- the language's templates from ``--prompts`` (same format;
image j of a class takes template j mod T) filled with the class name, or the bare name -- and the model
draws one image per prompt (:meth:`vlm.vision_llm.t2i.TextToImage.generate`, with the sampling settings
and guidance scale given). An *independent* classifier -- a dual encoder trained separately
(``--classifier DIR``, anything ``vlm.model.load_model`` reads) -- classifies every image zero-shot over the
class names of ``--classifier-lang`` (default ``en``: the generation language is then the only thing that
varies, and the classifier's own language skills are not measured; ``prompt`` uses the prompt's language),
with the prompt-ensemble class embeddings of :func:`vlm.eval.zeroshot.class_embeddings`. Reported per
prompt language: ``accuracy`` = % of images the classifier assigns to the prompted class, chance 100 / C;
with ``--baseline DIR`` (e.g. the same model trained with every caption dropped) also ``accuracy_baseline``.
Writes ``{name}.json|md|png`` (:mod:`vlm.eval.report`) and ``{name}-grid.png``: one row per language, one
column per class (the first image of each), so a reader sees what was drawn.
"""
from __future__ import annotations

from pathlib import Path

from vlm.errors import UserError

# torch is imported inside the functions: ``vlm --help`` builds this sub-command's parser.


def add_arguments(sub) -> None:
    """The ``t2i`` sub-command of ``vlm eval`` (``sub``: its sub-parsers)."""
    p = sub.add_parser("t2i", help="text-to-image: share of images an independent classifier assigns to the "
                                   "prompted class, per prompt language")
    p.add_argument("--model", required=True, help="text-to-image model directory (vlm train, task: t2i)")
    p.add_argument("--classifier", required=True, help="an independently trained dual encoder directory")
    p.add_argument("--labels", required=True, help="labels file {LANG: [class_indices, names]} (Babel-ImageNet)")
    p.add_argument("--prompts", default=None, help="prompts file {LANG: [templates with {}]} (default: bare names)")
    p.add_argument("--langs", default="all", help="comma-separated prompt languages (default: all in the labels)")
    p.add_argument("--classifier-lang", default="en",
                   help="language of the classifier's class names: a code, or 'prompt' (default en)")
    p.add_argument("--per-class", type=int, default=4, help="images per class and language (default 4)")
    p.add_argument("--baseline", default=None, help="a second t2i model scored the same way (e.g. unconditioned)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images generated per batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval_out", help="report directory (default ./eval_out)")
    p.add_argument("--name", default="t2i", help="report file name without extension (default t2i)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the models' directories run the Python code they ship")


def prompt_rows(labels, prompts, langs: list[str], per_class: int) -> list[dict]:
    """``[{lang, class_id, index, text}]``: ``per_class`` prompts per class and language (module docstring)."""
    from vlm.eval.babel import render

    rows = []
    for lang in langs:
        tmpls = (prompts.templates.get(lang) if prompts is not None else None) or ["{}"]
        for cid, name in zip(labels.classes[lang], labels.labels[lang]):
            for j in range(per_class):
                rows.append({"lang": lang, "class_id": int(cid), "index": j, "text": render(tmpls[j % len(tmpls)], name)})
    return rows


def classifier_heads(classifier, labels, prompts, langs: list[str], classifier_lang: str) -> dict[str, tuple]:
    """Per prompt language: (class ids ``[C]``, class embeddings ``[C, E]``) of the classifier in
    ``classifier_lang`` (or the prompt's own language for ``"prompt"``), over that language's classes."""
    import torch

    from vlm.eval.babel import norm_code, templates_for
    from vlm.eval.zeroshot import class_embeddings, make_text_encoder

    enc = make_text_encoder(classifier)
    out, cache = {}, {}
    for lang in langs:
        cl = lang if classifier_lang == "prompt" else norm_code(classifier_lang)
        if cl not in labels.classes:
            raise UserError(f"--classifier-lang {classifier_lang}: the labels file has no {cl.upper()} names; "
                            f"choose one of {', '.join(c for c in labels.languages)} or 'prompt'")
        ids = labels.classes[lang]
        if cl not in cache:
            tmpls = templates_for(cl, "translated", prompts)[0] if prompts is not None else ["{}"]
            cache[cl] = (labels.classes[cl], class_embeddings(enc, labels.labels[cl], tmpls))
        cl_ids, emb = cache[cl]
        pos = {c: i for i, c in enumerate(cl_ids)}
        missing = [c for c in ids if c not in pos]
        if missing:
            raise UserError(f"classes {missing[:5]} of {lang.upper()} have no {cl.upper()} name in the labels file; "
                            "use --classifier-lang prompt")
        out[lang] = (torch.tensor(ids), emb[[pos[c] for c in ids]])
    return out


def classify(classifier, images):
    """Images ``[B,3,S,S]`` in [0, 1] -> unit image embeddings ``[B, E]`` of the classifier (resized to its
    input size, normalised with its mean/std)."""
    import torch
    import torch.nn.functional as F

    pre = classifier.image_preprocess
    with torch.inference_mode():
        x = images.float()
        if x.shape[-1] != pre.image_size or x.shape[-2] != pre.image_size:
            x = F.interpolate(x, size=(pre.image_size, pre.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp(0, 1)
        return classifier.encode_image(pre.normalize(x), normalize=True).float().cpu()


def generate_all(model, rows: list[dict], *, sampling_kw: dict, seed: int, batch_size: int,
                 device: str = "cpu"):
    """One image per row, ``[len(rows), 3, S, S]`` in [0, 1]; batch i is seeded ``seed + i`` (reproducible
    whatever else runs)."""
    import torch

    from vlm.vision_llm.t2i_heads import Sampling

    outs = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        g = torch.Generator(device=device).manual_seed(seed + i)
        s = Sampling(**sampling_kw, generator=g)
        outs.append(model.generate([r["text"] for r in chunk], [r["lang"] for r in chunk], sampling=s).cpu())
    return torch.cat(outs)


def score(rows: list[dict], image_emb, heads: dict) -> dict[str, float]:
    """Per language, % of its images whose top class (over that language's classes) is the prompted one."""
    hits: dict[str, list[bool]] = {}
    for i, r in enumerate(rows):
        ids, emb = heads[r["lang"]]
        pred = int(ids[int((image_emb[i] @ emb.T).argmax())])
        hits.setdefault(r["lang"], []).append(pred == r["class_id"])
    return {lang: 100.0 * sum(h) / len(h) for lang, h in hits.items()}


def evaluate_t2i(model, classifier, labels, prompts, langs: list[str], *, per_class: int = 4,
                 classifier_lang: str = "en", sampling_kw: dict | None = None, seed: int = 0, batch_size: int = 32,
                 device: str = "cpu", baseline=None) -> tuple[dict, object, list[dict]]:
    """-> (results dict for :func:`vlm.eval.report.write_report`, the images ``[M,3,S,S]``, their rows)."""
    sampling_kw = dict(sampling_kw or {})
    rows = prompt_rows(labels, prompts, langs, per_class)
    heads = classifier_heads(classifier, labels, prompts, langs, classifier_lang)
    images = generate_all(model, rows, sampling_kw=sampling_kw, seed=seed, batch_size=batch_size, device=device)
    acc = score(rows, classify(classifier, images.to(device)), heads)
    acc_b = None
    if baseline is not None:
        b_images = generate_all(baseline, rows, sampling_kw=sampling_kw, seed=seed, batch_size=batch_size,
                                device=device)
        acc_b = score(rows, classify(classifier, b_images.to(device)), heads)
    per = {}
    for lang in langs:
        n_cls = len(labels.classes[lang])
        per[lang] = {"n": n_cls * per_class, "accuracy": acc[lang], "accuracy_chance": 100.0 / n_cls,
                     **({"accuracy_baseline": acc_b[lang]} if acc_b is not None else {})}
    metrics = ["accuracy"] + (["accuracy_baseline"] if acc_b is not None else [])
    summary = {"n_languages": len(per), "n_total": sum(r["n"] for r in per.values()),
               **{f"mean_{m}": sum(r[m] for r in per.values()) / max(1, len(per)) for m in metrics},
               "mean_accuracy_chance": sum(r["accuracy_chance"] for r in per.values()) / max(1, len(per))}
    results = {"task": "t2i", "primary_metric": "accuracy", "metrics": metrics, "per_language": per,
               "summary": summary, "classifier_lang": classifier_lang, "per_class": per_class,
               "sampling": sampling_kw, "seed": seed,
               "warnings": ["accuracy: % of generated images the independent classifier assigns to the prompted "
                            "class (chance in brackets)"]}
    return results, images, rows


def save_grid(images, rows: list[dict], langs: list[str], path: str | Path, scale: int = 2) -> str:
    """The first image of each (language, class): one row per language, one column per class (PNG)."""
    from vlm.vision_llm.t2i import save_png

    firsts = [i for i, r in enumerate(rows) if r["index"] == 0]
    n_cols = max(1, len(firsts) // max(1, len(langs)))
    return str(save_png(images[firsts], path, scale=scale, nrow=n_cols))


def run_t2i(args) -> int:
    from vlm.eval.babel import load_labels, load_prompts, resolve_langs
    from vlm.eval.report import write_report
    from vlm.model import load_model
    from vlm.vision_llm.t2i import TextToImage
    from vlm.vision_llm.t2i_heads import Sampling

    if args.per_class < 1 or args.batch_size < 1:
        raise UserError(f"--per-class and --batch-size must be >= 1, got {args.per_class} and {args.batch_size}")
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, guidance=args.guidance)
    Sampling(**kw).check()
    for flag in ("model", "classifier", "baseline"):
        v = getattr(args, flag)
        if v is not None and not Path(v).is_dir():
            raise UserError(f"--{flag} {v} is not a directory")
    labels = load_labels(args.labels)
    prompts = load_prompts(args.prompts) if args.prompts else None
    langs = resolve_langs(args.langs, labels)
    trust = args.trust_remote_code
    model = TextToImage.from_pretrained(args.model, device=args.device, trust_remote_code=trust)
    baseline = TextToImage.from_pretrained(args.baseline, device=args.device, trust_remote_code=trust) \
        if args.baseline else None
    classifier = load_model(args.classifier, trust_remote_code=trust).to(args.device).eval()
    results, images, rows = evaluate_t2i(model, classifier, labels, prompts, langs, per_class=args.per_class,
                                         classifier_lang=args.classifier_lang, sampling_kw=kw, seed=args.seed,
                                         batch_size=args.batch_size, device=args.device, baseline=baseline)
    grid = save_grid(images, rows, langs, Path(args.out) / f"{args.name}-grid.png")
    paths = write_report(results, args.out, args.name, {"command": "vlm eval t2i", "model": args.model,
                                                        "classifier": args.classifier, "baseline": args.baseline,
                                                        "labels": args.labels, "prompts": args.prompts,
                                                        "grid": grid})
    print(Path(paths["markdown"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join([*paths.values(), grid]))
    return 0
