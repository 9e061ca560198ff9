"""Image-text retrieval, per language, with several captions per image (XM3600 style).

Core (model-agnostic): ``retrieval_recall(image_emb [N, E], text_emb [T, E], text_to_image [T])``:

* text-to-image R@K: a text is a hit when its image ranks in the top K of the N images;
* image-to-text R@K: an image is a hit when *any* of its captions ranks in the top K of the T texts
  (i.e. its best-ranked caption does).

Ranks break ties deterministically: an item with an equal score ranks ahead only if its index is lower
(``eval.zeroshot.true_class_rank``); no sort is needed, and the similarity matrix is processed in
chunks so it never has to exist whole. Images without a caption (in the language) are left out of that
language's gallery. Chance levels are exact for a random ranking: t2i R@K = min(K, N)/N; i2t R@K for an
image with m captions among T = 1 - C(T-m, K)/C(T, K), averaged over images. Metrics are percentages;
``mean_recall`` is the mean of the six recalls (the usual single-number summary).

``evaluate_retrieval`` embeds each language's captions once (images are embedded once for all
languages by the caller) and returns the results dict for ``eval.report``. Shards are read by the
training loader (``make_loader(task="image")`` through :mod:`eval.shards`), whose batches carry every
sample's captions in all its languages: ``vlm eval retrieval`` embeds the images and collects the
captions in that one pass (:func:`captions_of`), so keys always join and a bad sample is skipped and
counted once, never raised. :func:`read_captions` is the captions-only form of the same pass.
"""
from __future__ import annotations

import unicodedata
from typing import Callable

import torch

from vlm.eval.zeroshot import encode_in, l2norm, true_class_rank
from vlm.errors import DataError

KS = (1, 5, 10)


def _i2t_chance(n_caps: torch.Tensor, T: int, k: int) -> float:
    """Mean over images of 1 - C(T-m, k)/C(T, k) (probability that a random ranking puts one of the m
    captions in the top k)."""
    k = min(k, T)
    out = []
    for m in n_caps.tolist():
        p_miss = 1.0
        for j in range(k):  # C(T-m, k)/C(T, k) = prod_j (T-m-j)/(T-j)
            p_miss *= max(T - m - j, 0) / (T - j)
        out.append(1.0 - p_miss)
    return 100.0 * sum(out) / len(out)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks=KS, chunk: int = 2048) -> dict:
    """Recall@K both ways. ``image_emb [N, E]``, ``text_emb [T, E]`` (normalised here), ``text_to_image [T]``
    (index of each text's image in ``image_emb``). Images with no text are ignored (counted in
    ``n_images_without_text``). Returns {i2t_r{K}, t2i_r{K}, their *_chance, mean_recall, n_images, n_texts}."""
    if text_to_image.dim() != 1 or text_to_image.shape[0] != text_emb.shape[0]:
        raise ValueError(f"text_to_image must be [T] with T = {text_emb.shape[0]}, got {tuple(text_to_image.shape)}")
    N = image_emb.shape[0]
    t2i = text_to_image.long()
    if t2i.numel() and (t2i.min() < 0 or t2i.max() >= N):
        raise ValueError(f"text_to_image holds indices outside [0, {N})")
    n_caps = torch.bincount(t2i, minlength=N)
    keep = n_caps > 0
    if not keep.any():
        raise ValueError("retrieval needs at least one text")
    remap = torch.cumsum(keep.long(), 0) - 1  # old image index -> index among kept images
    img = l2norm(image_emb[keep].float())
    txt = l2norm(text_emb.float())
    t2i = remap[t2i]
    n_caps = n_caps[keep]
    N, T = img.shape[0], txt.shape[0]
    ks = tuple(ks)
    # text -> image: rank of the text's image among all images
    t_rank = torch.cat([true_class_rank(txt[i:i + chunk] @ img.t(), t2i[i:i + chunk]) for i in range(0, T, chunk)])
    # image -> text: rank of the image's best caption (highest score, lowest index among equals)
    i_rank = []
    for i in range(0, N, chunk):
        s = img[i:i + chunk] @ txt.t()                                   # [n, T]
        pos = t2i[None, :] == torch.arange(i, i + s.shape[0])[:, None]    # [n, T]
        best = torch.where(pos, s, torch.full_like(s, float("-inf"))).max(1).values
        best_idx = (pos & (s == best[:, None])).int().argmax(1)          # first maximal positive
        i_rank.append(true_class_rank(s, best_idx))
    i_rank = torch.cat(i_rank)
    out = {"n_images": N, "n_texts": T, "n_images_without_text": int((~keep).sum())}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i_rank < k).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (t_rank < k).float().mean().item()
        out[f"i2t_r{k}_chance"] = _i2t_chance(n_caps, T, k)
        out[f"t2i_r{k}_chance"] = 100.0 * min(k, N) / N
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    out["mean_recall"] = sum(out[n] for n in names) / len(names)
    out["mean_recall_chance"] = sum(out[n + "_chance"] for n in names) / len(names)
    return out


def evaluate_retrieval(image_emb: torch.Tensor, captions: list[dict[str, list[str]]],
                       encode_texts: Callable[[list], torch.Tensor], langs: list[str] | None = None,
                       ks=KS, text_batch_size: int = 256, progress: bool = False) -> dict:
    """Per-language retrieval. ``image_emb [N, E]`` (embedded once), ``captions[i]`` = {lang: [captions]} of
    image i; ``encode_texts(list[str]) -> [M, E]`` (called with ``lang=`` when it ``takes_lang``,
    :func:`vlm.eval.zeroshot.encode_in`). Languages default to every language with a caption.
    Returns the results dict (task "retrieval", primary metric mean_recall) for ``eval.report``."""
    if len(captions) != image_emb.shape[0]:
        raise ValueError(f"{len(captions)} caption entries for {image_emb.shape[0]} images")
    have = sorted({lang for c in captions for lang, caps in c.items() if caps})
    if langs is None:
        langs = have
    langs = [lang.lower() for lang in langs]
    missing = [lang for lang in langs if lang not in have]
    if missing:
        raise DataError(f"no captions in language(s) {', '.join(missing)}; the data has: {', '.join(have)}")
    it = langs
    if progress:
        from tqdm import tqdm
        it = tqdm(langs, desc="retrieval", unit="lang")
    per_lang = {}
    for lang in it:
        texts, owner = [], []
        for i, c in enumerate(captions):
            for t in c.get(lang, []):
                texts.append(unicodedata.normalize("NFC", t))
                owner.append(i)
        embs = [encode_in(encode_texts, texts[j:j + text_batch_size], lang).float()
                for j in range(0, len(texts), text_batch_size)]
        with torch.inference_mode():
            per_lang[lang] = retrieval_recall(image_emb, torch.cat(embs), torch.tensor(owner), ks)
    metrics = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks] + ["mean_recall"]
    summary = {"n_languages": len(per_lang), "n_images_total": int(image_emb.shape[0])}
    for m in metrics:
        summary[f"mean_{m}"] = sum(r[m] for r in per_lang.values()) / max(len(per_lang), 1)
        summary[f"mean_{m}_chance"] = sum(r[m + "_chance"] for r in per_lang.values()) / max(len(per_lang), 1)
    return {"task": "retrieval", "primary_metric": "mean_recall", "metrics": metrics, "per_language": per_lang,
            "summary": summary, "warnings": []}


def captions_of(batches, into: dict):
    """Pass ``batches`` (loader batches with ``key`` and ``captions`` lists) through unchanged, collecting
    ``into[key] = {lang: [NFC captions]}`` for the samples that have captions."""
    for b in batches:
        for key, caps in zip(b.get("key") or [], b.get("captions") or []):
            if caps:
                into[key] = {lang: [unicodedata.normalize("NFC", c) for c in cs] for lang, cs in caps.items()}
        yield b


def read_captions(spec, default_lang: str | None = None, *, stats=None, num_workers: int = 0
                  ) -> dict[str, dict[str, list[str]]]:
    """{sample key: {lang: [captions]}} of every usable sample of the shards ``spec`` (anything
    ``vlm.data.decode.expand_shards`` takes), read by the training loader (``task="caption"``: ``.json``
    ``captions`` {lang: str | [str]}, or the ``.txt`` caption in ``json["lang"]``), so keys and language
    codes match the image batches. Unusable samples and broken shards are skipped and counted in
    ``stats`` (a ``vlm.data.decode.SkipStats``), never raised."""
    from vlm.eval.shards import ordered_stream, samples
    from vlm.towers.base import ImagePreprocess

    # the images are decoded (the loader's validity test is the same as for training), at a small size
    stream = ordered_stream(spec, ImagePreprocess(image_size=16), task="caption", batch_size=64,
                            num_workers=num_workers, default_lang=default_lang, fields=("key", "captions"))
    out: dict[str, dict[str, list[str]]] = {}
    for s in samples(stream, stats):
        out[s["key"]] = {lang: [unicodedata.normalize("NFC", c) for c in cs] for lang, cs in s["captions"].items()}
    return out
