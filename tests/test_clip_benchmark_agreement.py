"""``vlm eval zeroshot`` agrees with clip_benchmark (PyPI ``clip-benchmark``), the tool multilingual CLIP
users run for Babel-ImageNet, on the same open_clip model (a tiny random-init one saved as a local
checkpoint; clip_benchmark loads it with ``open_clip.create_model_and_transforms``, we through
``open_clip:<arch>`` towers) and the same images.

What is checked, per language:

* class embeddings: ours (read back from the text-embedding cache the CLI wrote) equal clip_benchmark's
  ``zero_shot_classifier`` (prompt embeddings L2-normalised, averaged over the template list, duplicates
  included, re-normalised) up to fp32 noise;
* image embeddings and per-image predictions equal with ``--preprocess torchvision``;
* top-1, top-5 (clip_benchmark: only with >= 5 classes) and mean per-class recall of the CLI report equal
  clip_benchmark's ``evaluate`` (on our label/prompt files) and, on Babel-ImageNet's own files, the numbers
  of clip_benchmark's own CLI (``clip_benchmark eval --dataset babel_imagenet``) on a fake ImageNet-val folder.

Differences found (explained in README "Evaluation"; none is a bug on our side):

* pixels: clip_benchmark uses torchvision's ``ImageFolder`` (``convert("RGB")``) + open_clip's evaluation
  transform (PIL resize of the shortest side, then center crop). Our default ``--preprocess loader`` is the
  data loader's crop-then-resize on uint8 tensors (the pixels of a shard; JPEG draft decoding for large
  sources; alpha on white), which samples non-square images at slightly other positions: per-image scores
  differ a little, and so can top-1. ``--preprocess torchvision`` reproduces clip_benchmark's pixels
  bit for bit (asserted below) and with it its numbers.
* languages with labels but no translated templates (BR, FY, LA): clip_benchmark raises KeyError on them;
  we fall back to the English templates (and warn). The fallback equals clip_benchmark fed the EN templates.
* top-5 with fewer than 5 classes: clip_benchmark reports NaN, we report rank < C (100%).
* precision: clip_benchmark's CLI defaults to autocast (``--no_amp`` turns it off; on CPU autocast is bf16);
  we compare fp32 with fp32 (our ``--precision fp32``, the default).
* clip_benchmark 1.6.2's ``accuracy`` calls ``float()`` on a 1-element array, which NumPy >= 2.4 refuses
  (TypeError); the test swaps in the same function with ``.item()`` (:func:`_fixed_accuracy`).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

cb = pytest.importorskip("clip_benchmark")

import open_clip  # noqa: E402
from clip_benchmark.metrics import zeroshot_classification as cbz  # noqa: E402
from PIL import Image  # noqa: E402

from test_towers import OC_ARCH, OC_CFG  # noqa: E402
from vlm.cli import main as vlm_main  # noqa: E402
from vlm.errors import UserError  # noqa: E402
from vlm.eval.babel import BUNDLED_LABELS, BUNDLED_PROMPTS, load_labels, load_prompts, templates_for  # noqa: E402
from vlm.eval.image_folder import ImageFolderDataset, folder_batches  # noqa: E402
from vlm.eval.zeroshot import TextEmbeddingCache, embed_images, model_fingerprint  # noqa: E402
from vlm.towers.open_clip import register_arch  # noqa: E402

CB_DIR = os.path.join(os.path.dirname(cb.__file__), "datasets")


def _fixed_accuracy(output, target, topk=(1,)):
    """clip_benchmark's ``accuracy``, with ``.item()`` where it calls ``float()`` on a 1-element array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum().item() / n for k in topk]


@pytest.fixture
def peer(monkeypatch):
    """clip_benchmark's metrics module, its ``accuracy`` repaired only where NumPy breaks it."""
    try:
        cbz.accuracy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), topk=(1,))
    except TypeError:
        monkeypatch.setattr(cbz, "accuracy", _fixed_accuracy)
    return cbz


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny open_clip ViT saved as an open_clip checkpoint, and the same weights as a vlm
    DualEncoder with open_clip towers (saved, for ``vlm eval zeroshot --model``)."""
    from vlm.model import DualEncoder

    root = tmp_path_factory.mktemp("cb_model")
    register_arch(OC_ARCH, OC_CFG)
    torch.manual_seed(1234)
    ck = root / "open_clip.pt"
    torch.save(open_clip.create_model(OC_ARCH).state_dict(), ck)
    tower = {"pretrained": str(ck), "model_cfg": OC_CFG}
    de = DualEncoder.from_config({"image_tower": f"open_clip:{OC_ARCH}", "text_tower": f"open_clip:{OC_ARCH}",
                                  "image_tower_cfg": tower, "text_tower_cfg": dict(tower)})
    model_dir = root / "dual"
    de.save_pretrained(model_dir)
    oc, _, preprocess = open_clip.create_model_and_transforms(OC_ARCH, pretrained=str(ck))
    return {"ckpt": str(ck), "model_dir": str(model_dir), "oc": oc.eval(), "preprocess": preprocess,
            "tokenizer": open_clip.get_tokenizer(OC_ARCH)}


def _image(rng, w, h, mode="RGB"):
    a = (rng.random((h // 6 + 1, w // 6 + 1, 4)) * 255).astype(np.uint8)
    return Image.fromarray(a, "RGBA").resize((w, h), Image.BILINEAR).convert(mode)


# a square image at the model's size, squares and non-square ones to resize, JPEG, grey, RGBA
SHAPES = [((32, 32), "RGB", "png"), ((64, 48), "RGB", "png"), ((61, 97), "RGB", "png"),
          ((500, 375), "RGB", "jpg"), ((120, 90), "L", "jpg"), ((50, 50), "RGBA", "png")]
FOLDERS = {"n01": 3, "n02": 7, "n03": 11, "n04": 20, "n05": 42}
LABELS = {"EN": [[3, 7, 11, 20, 42], ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]],
          "DE": [[42, 3, 11, 20], ["Hammerhai", "Schleie", "Weißer Hai", "Tigerhai"]],
          "ZH": [[7, 42, 3], ["金鱼", "锤头鲨", "丁鲷"]],
          "BR": [[11, 7], ["rinkin gwenn", "pesk aour"]]}  # labels, no templates: EN fallback
PROMPTS = {"EN": ["a photo of a {}.", "a bad photo of the {}.", "a photo of a {}.", "art of the {}", "{}"],
           "DE": ["ein Foto von {}.", "ein schlechtes Foto von {}", "ein Foto von {}."],
           "ZH": ["{}的照片", "一张{}的照片。", "{}的照片"]}


def _write_folder(root):
    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        os.makedirs(root / "imgs" / folder)
        for j, ((w, h), mode, ext) in enumerate(SHAPES):
            _image(rng, w, h, mode).save(root / "imgs" / folder / f"{j}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    (root / "class_map.json").write_text(json.dumps(FOLDERS))
    (root / "labels.json").write_text(json.dumps(LABELS, ensure_ascii=False), encoding="utf-8")
    (root / "prompts.json").write_text(json.dumps(PROMPTS, ensure_ascii=False), encoding="utf-8")


class _PeerFolder(torch.utils.data.Dataset):
    """clip_benchmark's ``BabelImageNet`` over our folder: the images of the language's classes, target =
    ``idxs.index(class id)``, read by torchvision's ``pil_loader`` and open_clip's transform."""

    def __init__(self, root, idxs, classnames, transform):
        from torchvision.datasets.folder import pil_loader

        self.loader, self.transform, self.classes = pil_loader, transform, classnames
        self.samples = [(os.path.join(root, f, x), idxs.index(c)) for f, c in sorted(FOLDERS.items()) if c in idxs
                        for x in sorted(os.listdir(os.path.join(root, f)))]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        return self.transform(self.loader(path)), target


def _run_vlm(tiny, out, *extra):
    rc = vlm_main(["eval", "zeroshot", "--model", tiny["model_dir"], "--out", str(out), "--name", "r",
                   "--cache-dir", str(out / "cache"), "--workers", "0", "--batch-size", "5", "--no-progress",
                   *extra])
    assert rc in (0, None)
    report = json.loads((out / "r.json").read_text(encoding="utf-8"))
    return report, TextEmbeddingCache(model_fingerprint(tiny["model_dir"]), str(out / "cache"))


def _cached_class_emb(cache, lang, labels, templates):
    from safetensors.torch import load_file

    path = os.path.join(cache.dir, cache.key(lang, labels, templates) + ".safetensors")
    return load_file(path)["class_embeddings"]


def _assert_same_metrics(ours: dict, theirs: dict, n_classes: int):
    assert ours["top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-4)
    assert ours["mean_per_class_recall"] == pytest.approx(100 * theirs["mean_per_class_recall"], abs=1e-4)
    if n_classes >= 5:
        assert ours["top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-4)
    else:  # clip_benchmark: NaN below 5 classes; ours: rank < C, i.e. every image
        assert np.isnan(theirs["acc5"]) and ours["top5"] == 100.0


def test_agreement_on_own_files(tiny, peer, tmp_path):
    """Our labels/prompts files (4 languages, overlapping class subsets in other orders, repeated templates,
    one language without templates), 30 images of 6 shapes: class embeddings, image embeddings, per-image
    predictions and top-1/top-5/mean per-class recall per language equal clip_benchmark's."""
    _write_folder(tmp_path)
    report, cache = _run_vlm(tiny, tmp_path / "out", "--image-folder", str(tmp_path / "imgs"), "--class-map",
                             str(tmp_path / "class_map.json"), "--labels", str(tmp_path / "labels.json"),
                             "--prompts", str(tmp_path / "prompts.json"), "--mode", "translated",
                             "--langs", "en,de,zh,br", "--preprocess", "torchvision")
    assert report["metadata"]["preprocess"] == "torchvision"
    labels, prompts = load_labels(str(tmp_path / "labels.json")), load_prompts(str(tmp_path / "prompts.json"))
    oc, pre, tok = tiny["oc"], tiny["preprocess"], tiny["tokenizer"]
    model = _load_dual(tiny)
    dset = ImageFolderDataset(str(tmp_path / "imgs"), model.image_preprocess, FOLDERS, "torchvision")
    emb, cls, keys = embed_images(model, folder_batches(dset, batch_size=5))
    assert len(keys) == len(FOLDERS) * len(SHAPES)
    top1 = {}
    for code, (idxs, names) in LABELS.items():
        lang = code.lower()
        temps, pset, _ = templates_for(lang, "translated", prompts)
        assert pset == ("en-fallback" if code == "BR" else f"translated:{lang}")
        # clip_benchmark's babel builder: '{}' -> '{c}', then template.format(c=classname)
        cb_temps = [t.replace("{}", "{c}") for t in temps]
        clf = peer.zero_shot_classifier(oc, tok, names, cb_temps, "cpu", amp=False)  # [E, C]
        ours_clf = _cached_class_emb(cache, lang, labels.labels[lang], temps)
        torch.testing.assert_close(ours_clf, clf.t().float(), atol=2e-6, rtol=0)
        ds = _PeerFolder(str(tmp_path / "imgs"), idxs, names, pre)
        dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)  # other batches than ours (5)
        theirs = peer.evaluate(oc, dl, tok, names, cb_temps, "cpu", amp=False)
        ours = report["per_language"][lang]
        assert ours["n_images"] == len(ds) == len(SHAPES) * len(idxs)
        _assert_same_metrics(ours, theirs, len(idxs))
        top1[lang] = ours["top1"]
        # per image: same logits (up to fp32), same predictions
        logits, target = peer.run_classification(oc, clf, dl, "cpu", amp=False)
        row = {k: i for i, k in enumerate(keys)}
        order = torch.tensor([row[p] for p, _ in ds.samples])  # our row of each peer sample
        ours_logits = 100.0 * emb[order] @ ours_clf.t()
        assert [idxs.index(c) for c in cls[order].tolist()] == target.tolist()
        torch.testing.assert_close(ours_logits, logits, atol=1e-4, rtol=0)
        assert torch.equal(ours_logits.argmax(1), logits.argmax(1))
    assert set(top1) == {"en", "de", "zh", "br"}


def _load_dual(tiny):
    from vlm.model import load_model

    return load_model(tiny["model_dir"]).eval()


def test_pixels_torchvision_mode_bitwise_and_loader_mode_differs(tiny, tmp_path):
    """``--preprocess torchvision`` gives clip_benchmark's normalised pixels bit for bit (every shape, JPEG,
    grey, RGBA); the loader's crop-then-resize differs on the resized non-square images (the one source of
    per-image differences in the default mode), not on an image already at the model's size."""
    from torchvision.datasets.folder import pil_loader

    _write_folder(tmp_path)
    model = _load_dual(tiny)
    pp = model.image_preprocess
    tv = ImageFolderDataset(str(tmp_path / "imgs"), pp, FOLDERS, "torchvision")
    ld = ImageFolderDataset(str(tmp_path / "imgs"), pp, FOLDERS)
    differs = {}
    for i, (path, _) in enumerate(tv.samples):
        ref = tiny["preprocess"](pil_loader(path))
        assert torch.equal(pp.normalize(tv[i]["pixels"][None])[0], ref), path
        differs[os.path.basename(path)] = not torch.equal(pp.normalize(ld[i]["pixels"][None])[0], ref)
    assert not differs["0.png"]                     # 32x32: nothing to resize, same pixels
    assert differs["1.png"] and differs["2.png"] and differs["3.jpg"]  # non-square: other sample positions
    with pytest.raises(UserError, match="preprocessing 'pil'"):
        ImageFolderDataset(str(tmp_path / "imgs"), pp, FOLDERS, "pil")
    # only the images of the evaluated classes are listed (and so decoded), as the CLI asks
    kept = ImageFolderDataset(str(tmp_path / "imgs"), pp, FOLDERS, "torchvision", keep_classes=[42, 7])
    assert len(kept) == 2 * len(SHAPES) and {c for _, c in kept.samples} == {7, 42}


def _fake_imagenet(root, shape=(40, 30)):
    """A torchvision ``ImageNet`` root (``meta.bin`` + ``val/<wnid>/``) with one image per class: what
    clip_benchmark's ``babel_imagenet`` dataset reads (``len // 1000`` images per class, in class order)."""
    rng = np.random.default_rng(1)
    wnids = [f"n{i:08d}" for i in range(1000)]
    torch.save(({w: (f"class {i}",) for i, w in enumerate(wnids)}, wnids), root / "meta.bin")
    for w in wnids:
        os.makedirs(root / "val" / w)
        _image(rng, *shape).save(root / "val" / w / f"ILSVRC2012_val_{w}.JPEG", quality=90)


def test_agreement_with_clip_benchmark_cli_on_babel_imagenet(tiny, peer, tmp_path, monkeypatch):
    """The real Babel-ImageNet files end to end: clip_benchmark's own CLI (its builder, its bundled label and
    NLLB prompt files, its BabelImageNet subsetting, open_clip's loader) against ``vlm eval zeroshot`` with
    the bundled files, on a fake ImageNet val folder, for the three smallest languages (OM 18, XH 35,
    HA 47 classes; 80 templates each, 54-57 distinct)."""
    from clip_benchmark import cli as cb_cli

    _fake_imagenet(tmp_path)
    langs = ["om", "xh", "ha"]
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", "babel_imagenet", "--dataset_root", str(tmp_path),
        "--model", OC_ARCH, "--pretrained", tiny["ckpt"], "--language", *langs, "--no_amp", "--num_workers",
        "0", "--batch_size", "16", "--quiet", "--output", str(tmp_path / "cb_{language}.json")])
    cb_cli.main()
    report, cache = _run_vlm(tiny, tmp_path / "out", "--image-folder", str(tmp_path / "val"), "--langs",
                             ",".join(langs), "--mode", "translated", "--preprocess", "torchvision")
    assert report["metadata"]["labels"] == os.path.abspath(BUNDLED_LABELS)
    labels, prompts = load_labels(BUNDLED_LABELS), load_prompts(BUNDLED_PROMPTS)
    for lang in langs:
        theirs = json.loads((tmp_path / f"cb_{lang}.json").read_text())
        assert theirs["language"] == lang and theirs["dataset"] == "babel_imagenet"
        ours = report["per_language"][lang]
        assert ours["n_images"] == labels.num_classes(lang)
        _assert_same_metrics(ours, theirs["metrics"], labels.num_classes(lang))
    # and the classifier clip_benchmark builds from its own files for OM equals our cached one
    temps = templates_for("om", "translated", prompts)[0]
    with open(os.path.join(CB_DIR, "babel_imagenet.json"), encoding="utf-8") as f:
        cb_names = json.load(f)["OM"][1]
    clf = peer.zero_shot_classifier(tiny["oc"], tiny["tokenizer"], cb_names, [t.replace("{}", "{c}") for t in temps],
                                    "cpu", amp=False)
    torch.testing.assert_close(_cached_class_emb(cache, "om", labels.labels["om"], temps), clf.t().float(),
                               atol=2e-6, rtol=0)


def test_bundled_babel_files_match_clip_benchmark():
    """Every language: the same class indices, labels and templates as clip_benchmark's copies of the
    Babel-ImageNet files; BR, FY and LA have no templates there (clip_benchmark raises KeyError), ours
    fall back to the EN templates."""
    with open(os.path.join(CB_DIR, "babel_imagenet.json"), encoding="utf-8") as f:
        cb_labels = json.load(f)
    with open(os.path.join(CB_DIR, "nllb_dist13b_prompts.json"), encoding="utf-8") as f:
        cb_prompts = json.load(f)
    labels, prompts = load_labels(BUNDLED_LABELS), load_prompts(BUNDLED_PROMPTS)
    assert sorted(c.lower() for c in cb_labels) == labels.languages and len(labels.languages) == 93
    for code, (idxs, names) in cb_labels.items():
        lang = code.lower()
        assert labels.classes[lang] == idxs and labels.labels[lang] == names, code
        temps, pset, _ = templates_for(lang, "translated", prompts)
        if code in cb_prompts:
            assert temps == cb_prompts[code] and pset == f"translated:{lang}", code
        else:
            assert code in ("BR", "FY", "LA") and temps == cb_prompts["EN"] and pset == "en-fallback"
