"""Zero-shot classification under the Babel-ImageNet protocol.

Design (scales to 93 languages x up to 1000 classes x 80 prompts):

1. **Images are embedded once** for all languages: ``image_emb [N, E]`` (L2-normalised) with their class
   ids ``[N]`` in the labels file's class space (ImageNet-1k indices for the real benchmark; the demo
   dataset's own indices for its ``labels.json``). ``embed_images`` does this from any iterable of
   batches (shards through ``vlm.data.wds.make_loader`` or :class:`ImageFolderDataset`), skipping images
   of classes no evaluated language has. A language with no image of its classes costs no text either.
2. **Class embeddings per language** (``class_embeddings``): every (template, label) text is encoded,
   each prompt embedding L2-normalised, averaged over the class's templates and re-normalised. Texts are
   encoded in batches and accumulated into ``[C, E]`` sums with ``index_add_``, so memory stays
   ``C x E`` even for 1000 classes x 80 prompts.
   Texts go in length order and each batch is cut to its longest text (``trimmed_padding``: checked once
   to give the same embeddings), so short prompts do not pay for a 77-token context.
3. **Cache** (:class:`TextEmbeddingCache`): class embeddings are kept in memory and on disk
   (safetensors, one file per entry, written atomically) keyed by sha256 of (model id, language, label
   strings, templates). A second run (or another mode sharing a prompt set) costs no text encoding.
4. **Scoring** (``score_language``): only the images whose class belongs to the language are scored,
   against that language's classes only. For every image the rank of the true class is
   ``#(scores > true) + #(scores == true and index < true index)`` — ties are broken deterministically
   towards the lower class index, with no sort. top-1 = rank 0, top-5 = rank < min(5, C); mean per-class
   recall = mean over classes that have images of their top-1 recall. Chance levels: top-1 1/C,
   top-5 min(5, C)/C, mean per-class recall 1/C. All metrics are percentages.

``evaluate_zeroshot`` ties these together and returns the results dict consumed by ``eval.report``.
Core functions take tensors and a text-encoder callable ``encode_texts(list[str]) -> [M, E]``; nothing
here depends on a particular model class. An encoder whose texts are prompted per language (a vision-LLM
embedder with ``lang_prompts``, :mod:`vlm.embedder`) says so with ``encode_texts.takes_lang = True`` and is
then called as ``encode_texts(texts, lang=code)`` with the language being scored (:func:`encode_in`).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import Counter
from typing import Callable, Iterable

import torch

from vlm.fileio import respect_umask
from vlm.eval.babel import BabelLabels, BabelPrompts, norm_code, render, resolve_langs, templates_for
from vlm.errors import DataError, UserError

EncodeTexts = Callable[[list], torch.Tensor]


def encode_in(encode_texts: EncodeTexts, texts: list, lang: str | None) -> torch.Tensor:
    """``encode_texts(texts)``, or ``encode_texts(texts, lang=lang)`` for an encoder with ``takes_lang``."""
    if lang is not None and getattr(encode_texts, "takes_lang", False):
        return encode_texts(texts, lang=lang)
    return encode_texts(texts)
METRICS = ("top1", "top5", "mean_per_class_recall")


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``[..., E]`` scaled to unit L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------- text side
def class_embeddings(encode_texts: EncodeTexts, labels: list[str], templates: list[str],
                     batch_size: int = 256, lang: str | None = None) -> torch.Tensor:
    """Prompt-ensemble class embeddings ``[C, E]`` (float32, unit rows) for ``C = len(labels)``.

    Each ``render(template, label)`` text is encoded (``encode_texts(list[str]) -> [M, E]``), L2-normalised,
    averaged over the templates of its class and re-normalised. A template listed k times (machine
    translation maps some of the 80 English prompts onto the same sentence) is encoded once and weighted k,
    which gives exactly the plain mean over the list. ``lang``: the texts' language, for an encoder that
    prompts per language (:func:`encode_in`)."""
    if not labels or not templates:
        raise ValueError("class_embeddings needs at least one label and one template")
    counts = Counter(templates)
    texts = [(c, render(t, lab), float(k)) for c, lab in enumerate(labels) for t, k in counts.items()]
    # similar lengths in one batch: the encoder trims padding to the batch's longest text (make_text_encoder)
    texts.sort(key=lambda x: len(x[1]))
    sums = None
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            emb = encode_in(encode_texts, [t for _, t, _ in chunk], lang)
            if emb.dim() != 2 or emb.shape[0] != len(chunk):
                raise ValueError(f"encode_texts returned shape {tuple(emb.shape)} for {len(chunk)} texts; "
                                 f"expected [{len(chunk)}, E]")
            emb = l2norm(emb.float().cpu()) * torch.tensor([k for _, _, k in chunk])[:, None]
            if sums is None:
                sums = torch.zeros(len(labels), emb.shape[1])
            sums.index_add_(0, torch.tensor([c for c, _, _ in chunk]), emb)
    return l2norm(sums / len(templates))


class TextEmbeddingCache:
    """Class embeddings keyed by (model id, language, label strings, templates): in memory and, when
    ``cache_dir`` is given, on disk as ``{cache_dir}/{model_id[:16]}/{key}.safetensors``."""

    def __init__(self, model_id: str, cache_dir: str | None = None):
        if not model_id:
            raise ValueError("TextEmbeddingCache needs a model id (e.g. model_fingerprint(model_dir))")
        self.model_id = model_id
        self.dir = os.path.join(cache_dir, hashlib.sha256(model_id.encode()).hexdigest()[:16]) if cache_dir else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    def key(self, lang: str, labels: list[str], templates: list[str]) -> str:
        blob = json.dumps([self.model_id, norm_code(lang), labels, templates], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, lang: str, labels: list[str], templates: list[str], compute: Callable[[], torch.Tensor]
            ) -> torch.Tensor:
        """Cached ``[C, E]`` class embeddings, computing (and storing) them with ``compute()`` on a miss."""
        from safetensors.torch import load_file, save_file

        k = self.key(lang, labels, templates)
        if k in self.memory:
            self.hits["memory"] += 1
            return self.memory[k]
        path = os.path.join(self.dir, k + ".safetensors") if self.dir else None
        if path and os.path.isfile(path):
            try:
                emb = load_file(path)["class_embeddings"]
                if emb.shape[0] == len(labels):
                    self.hits["disk"] += 1
                    self.memory[k] = emb
                    return emb
            except Exception as e:  # a damaged cache entry is recomputed, never trusted
                warnings.warn(f"ignoring unreadable text-embedding cache file {path}: {e}")
        self.misses += 1
        emb = compute().float().contiguous()
        self.memory[k] = emb
        if path:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            try:
                save_file({"class_embeddings": emb}, tmp, metadata={
                    "model_id": self.model_id, "lang": norm_code(lang), "n_classes": str(len(labels)),
                    "n_templates": str(len(templates))})
                respect_umask(tmp)  # mkstemp and safetensors create 0600
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return emb


# ----------------------------------------------------------------------------------------------- scoring
def true_class_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank of the target column in each row of ``logits [N, C]`` (``target [N]``) -> ``[N]`` int64.

    Rank = #(higher scores) + #(equal scores at a lower index): deterministic tie-breaking."""
    true = logits.gather(1, target[:, None])
    idx = torch.arange(logits.shape[1], device=logits.device)
    ahead = (logits > true) | ((logits == true) & (idx[None, :] < target[:, None]))
    return ahead.sum(1)


def score_language(image_emb: torch.Tensor, image_classes: torch.Tensor, lang_classes: list[int],
                   class_emb: torch.Tensor, chunk: int = 4096) -> dict:
    """Score one language. ``image_emb [N, E]`` unit rows, ``image_classes [N]`` (class ids in the labels
    file's space, -1 = none), ``lang_classes`` the language's C class ids, ``class_emb [C, E]``.

    Returns percentages top1/top5/mean_per_class_recall with their ``*_chance``, plus n_images, n_classes,
    n_classes_with_images. With no image of the language's classes the metrics are None."""
    C = len(lang_classes)
    if class_emb.shape[0] != C:
        raise ValueError(f"class_emb has {class_emb.shape[0]} rows for {C} classes")
    size = max(max(lang_classes) + 1, int(image_classes.max()) + 1 if image_classes.numel() else 0)
    local = torch.full((size,), -1, dtype=torch.long)
    local[torch.tensor(lang_classes, dtype=torch.long)] = torch.arange(C)
    valid = image_classes >= 0
    target = torch.full_like(image_classes, -1)
    target[valid] = local[image_classes[valid]]
    sel = target >= 0
    x, y = image_emb[sel].float(), target[sel]
    out = {"n_images": int(y.numel()), "n_classes": C, "top1_chance": 100.0 / C,
           "top5_chance": 100.0 * min(5, C) / C, "mean_per_class_recall_chance": 100.0 / C}
    if y.numel() == 0:
        out.update(top1=None, top5=None, mean_per_class_recall=None, n_classes_with_images=0)
        return out
    w = class_emb.float().t()
    ranks = torch.cat([true_class_rank(x[i:i + chunk] @ w, y[i:i + chunk]) for i in range(0, len(y), chunk)])
    hit1 = (ranks == 0).float()
    per_class_n = torch.bincount(y, minlength=C).float()
    per_class_hit = torch.bincount(y, weights=hit1, minlength=C)
    present = per_class_n > 0
    out.update(top1=100.0 * hit1.mean().item(), top5=100.0 * (ranks < min(5, C)).float().mean().item(),
               mean_per_class_recall=100.0 * (per_class_hit[present] / per_class_n[present]).mean().item(),
               n_classes_with_images=int(present.sum()))
    return out


def evaluate_zeroshot(image_emb: torch.Tensor, image_classes: torch.Tensor, labels: BabelLabels,
                      prompts: BabelPrompts | None = None, mode: str = "translated",
                      encode_texts: EncodeTexts | None = None,
                      precomputed: dict[str, torch.Tensor] | None = None, langs=None,
                      cache: TextEmbeddingCache | None = None, text_batch_size: int = 256,
                      progress: bool = False) -> dict:
    """Babel-ImageNet zero-shot over ``langs`` (default: all in ``labels``).

    ``image_emb [N, E]`` (L2-normalised; re-normalised here anyway) and ``image_classes [N]``; either
    ``encode_texts(list[str]) -> [M, E]`` or ``precomputed`` {lang: class embeddings [C, E]} in the order of
    the language's classes. Returns the results dict for ``eval.report.write_report``: task, mode,
    primary_metric, metrics, per_language {lang: score_language(...) + prompt_set, n_templates}, summary
    (means over languages with images), warnings, cache statistics."""
    if image_emb.dim() != 2 or image_classes.dim() != 1 or image_emb.shape[0] != image_classes.shape[0]:
        raise ValueError(f"need image_emb [N, E] and image_classes [N]; got {tuple(image_emb.shape)} and "
                         f"{tuple(image_classes.shape)}")
    if encode_texts is None and precomputed is None:
        raise ValueError("evaluate_zeroshot needs encode_texts or precomputed class embeddings")
    image_emb = l2norm(image_emb.float())
    image_classes = image_classes.long()
    langs = resolve_langs(langs, labels)
    precomputed = {norm_code(k): v for k, v in (precomputed or {}).items()}
    per_lang, warn = {}, []
    it = langs
    if progress:
        from tqdm import tqdm
        it = tqdm(langs, desc=f"zero-shot ({mode})", unit="lang")
    for lang in it:
        names = labels.labels[lang]
        if not torch.isin(image_classes, torch.tensor(labels.classes[lang])).any():
            # no image of this language's classes: nothing to score, so no text to encode
            cemb, pset, ntemp = torch.zeros(len(names), 1), "not-computed", 0
        elif lang in precomputed:
            cemb, pset, ntemp = precomputed[lang], "precomputed", 0
        else:
            if encode_texts is None:
                raise UserError(f"no precomputed class embeddings for {lang!r} and no text encoder given")
            temps, pset, w = templates_for(lang, mode, prompts)
            if w:
                warn.append(w)
            ntemp = len(temps)

            def compute(names=names, temps=temps, lang=lang):
                return class_embeddings(encode_texts, names, temps, text_batch_size, lang)
            cemb = cache.get(lang, names, temps, compute) if cache is not None else compute()
        res = score_language(image_emb, image_classes, labels.classes[lang], cemb)
        res.update(prompt_set=pset, n_templates=ntemp)
        if res["n_images"] == 0:
            warn.append(f"{lang.upper()}: no image of its {res['n_classes']} classes; not scored")
        per_lang[lang] = res
    scored = [r for r in per_lang.values() if r["top1"] is not None]
    summary = {"n_languages": len(per_lang), "n_languages_scored": len(scored), "n_images_total": len(image_classes)}
    for m in METRICS:
        summary[f"mean_{m}"] = sum(r[m] for r in scored) / len(scored) if scored else None
        summary[f"mean_{m}_chance"] = sum(r[f"{m}_chance"] for r in scored) / len(scored) if scored else None
    out = {"task": "zeroshot", "mode": mode, "primary_metric": "top1", "metrics": list(METRICS),
           "per_language": per_lang, "summary": summary, "warnings": warn}
    if cache is not None:
        out["cache"] = {"memory_hits": cache.hits["memory"], "disk_hits": cache.hits["disk"],
                        "misses": cache.misses, "dir": cache.dir}
    return out


# ----------------------------------------------------------------------------------------------- model side
def _autocast(device, bf16: bool):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def make_text_encoder(model, device: str | torch.device = "cpu", batch_size: int = 256,
                      bf16: bool = False) -> EncodeTexts:
    """``encode_texts(list[str]) -> [M, E]`` (unit rows, float32, CPU) from a model with ``.tokenizer`` and
    ``encode_text(input_ids [B, L], attention_mask [B, L]) -> [B, E]``; batched, under inference mode
    (and bf16 autocast when ``bf16``: part of the cache's model id, since it changes the numbers). A model
    with ``lang_aware_text`` (an embedder that prompts each text in its language) gets an encoder with
    ``takes_lang``: ``encode_texts(texts, lang=code)`` tokenizes through ``model.tokenizer(texts, code)``."""
    tok = model.tokenizer
    lang_aware = bool(getattr(model, "lang_aware_text", False))
    trim = {"ok": None}  # None: not checked yet; then whether this tower gives the same embeddings trimmed

    def run(t):
        return l2norm(model.encode_text(t["input_ids"].to(device), t["attention_mask"].to(device),
                                        normalize=True).float()).cpu()

    def encode_texts(texts: list, lang: str | None = None) -> torch.Tensor:
        outs = []
        with torch.inference_mode(), _autocast(device, bf16):
            for i in range(0, len(texts), batch_size):
                chunk = list(texts[i:i + batch_size])
                t = tok(chunk, lang) if lang_aware and lang is not None else tok(chunk)
                short = trimmed_padding(t) if trim["ok"] is not False else None
                if short is None:
                    outs.append(run(t))
                elif trim["ok"]:
                    outs.append(run(short))
                else:  # first trimmable batch: keep trimming only if it changes nothing
                    full = run(t)
                    try:
                        trim["ok"] = bool(torch.allclose(run(short), full, rtol=1e-4, atol=1e-5))
                    except Exception:  # noqa: BLE001 - a tower that needs its full context length
                        trim["ok"] = False
                    outs.append(full)
        return torch.cat(outs)
    encode_texts.takes_lang = lang_aware
    return encode_texts


def trimmed_padding(t: dict) -> dict | None:
    """Tokenizer output ``input_ids``/``attention_mask [B, L]`` cut to ``[B, L']``, ``L'`` = the longest text's
    length, when the padding is on the right (else None: nothing to cut, or left/inner padding). Texts of a
    zero-shot classifier are short (a CLIP prompt is ~10-20 of 77 tokens), so the text tower does a fraction of
    the work; :func:`make_text_encoder` uses it only after checking, on the first batch, that the tower gives
    the same embeddings (a tower that pools over padding would not)."""
    mask = t.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    n = int(mask.sum(1).max()) if mask.numel() else 0
    if n == 0 or n >= mask.shape[1] or bool(mask[:, n:].any()):
        return None
    return {"input_ids": t["input_ids"][:, :n], "attention_mask": mask[:, :n]}


def embed_images(model, batches: Iterable[dict], device: str | torch.device = "cpu", progress: bool = False,
                 total: int | None = None, bf16: bool = False, keep_classes=None
                 ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Embed every batch once -> (image_emb [N, E] unit rows, class_ids [N] (-1 when absent), keys [N]).

    ``batches`` yields Batch dicts with ``pixels`` uint8 [B, 3, H, W] and optionally ``class_id`` [B] and
    ``key`` (list of B strings). ``keep_classes`` (ids): embed only images of these classes -- for zero-shot
    the union of the evaluated languages' classes, so an image no language scores costs nothing."""
    embs, cls, keys = [], [], []
    keep = torch.as_tensor(sorted(keep_classes), dtype=torch.long) if keep_classes is not None else None
    it = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc="images", unit="batch", total=total)
    with torch.inference_mode(), _autocast(device, bf16):
        for b in it:
            px = b["pixels"]
            c = b.get("class_id")
            c = c.long().cpu() if c is not None else torch.full((px.shape[0],), -1, dtype=torch.long)
            k = list(b.get("key") or [""] * px.shape[0])
            if keep is not None:
                sel = torch.isin(c, keep)
                if not sel.any():
                    continue
                if not sel.all():
                    px, c, k = px[sel], c[sel], [x for x, s in zip(k, sel.tolist()) if s]
            embs.append(l2norm(model.encode_image(px.to(device), normalize=True).float()).cpu())
            cls.append(c)
            keys.extend(k)
    if not embs:
        raise DataError("no images were read" + (" of the evaluated languages' classes" if keep is not None else "")
                        + ": check the image shards/folder path and the class ids (json 'label' / class map)")
    return torch.cat(embs), torch.cat(cls), keys


def model_fingerprint(path: str) -> str:
    """A model id for the text cache: sha256 over the model's files (config, weights, tokenizer files,
    recursively, in sorted order), streamed."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    else:
        files = [path]
    for f in files:
        if f.endswith((".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt")):
            h.update(os.path.relpath(f, path).encode() if os.path.isdir(path) else os.path.basename(f).encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()
