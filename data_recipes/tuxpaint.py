"""Tux Paint stamps -> multilingual image-caption shards with a fixed train/val split by stamp.

    vlm shards build --format tuxpaint /usr/share/tuxpaint/stamps --out tux_shards --resize 224
    # get the stamps without installing: apt-get download tuxpaint-stamps-default && dpkg-deb -x *.deb /tmp/tux
    #   -> /tmp/tux/usr/share/tuxpaint/stamps

    from vlm.data_recipes.tuxpaint import build_tuxpaint
    res = build_tuxpaint("/tmp/tux/usr/share/tuxpaint/stamps", "tux_shards", resize=224)

The source: Debian's ``tuxpaint-stamps-default`` (GPL-2) is a folder tree of clip-art stamps by category
(``animals/birds/blackbird.png``); beside each ``NAME.png`` a ``NAME.txt`` whose first line is the English
description and whose other lines are ``LOCALE.utf8=caption`` (``de.utf8=``, ``pt_BR.utf8=``,
``ca@valencia.utf8=``, ``sr@latin.utf8=``). Reading rules:

- **Locales** go through :func:`vlm.data.langs.normalize_lang` (langcodes), by way of the rows-file rules
  (:func:`vlm.data_recipes.rows.parse_row`): ``pt_BR`` and ``pt`` both become ``pt`` (their captions are
  kept together, duplicates removed), ``zh_TW`` is ``zh-Hant``, ``sr@latin`` ``sr-Latn``, ``ca@valencia``
  ``ca-valencia``; an unknown locale's caption is dropped and counted per code in the manifest
  (``dropped_caption_langs``), the stamp kept. Lines without ``=`` after the first are ignored.
- **Duplicates**: Tux Paint ships mirrored or flipped copies of some stamps (``NAME_mirror.png``,
  ``NAME_flip.png``, redrawn, so not pixel-exact mirrors) without a description of their own: they are
  dropped as ``mirrored_duplicate``. A stamp whose composited pixels equal an earlier stamp's (the same
  picture in two folders), or equal that stamp mirrored or flipped *and* described by the same English
  line, is dropped as ``duplicate_image`` (so ``<`` and its mirror ``>`` both stay), so the split cannot put
  the same picture on both sides. Stamps are visited in sorted path order, so the first name is kept. Any
  other PNG without a ``.txt`` is skipped as ``no_description``, a ``.txt`` whose stamp is SVG-only as
  ``no_png``.
- **Pixels**: every mode PIL opens (RGBA, LA, palette with a transparent index, greyscale, 16-bit) is
  converted to RGBA and composited on white, then padded with white to a square (a stamp is an object on
  nothing: padding keeps all of it where a centre crop would cut it); written as PNG.
- **Split**: fixed and by stamp: the stamp's group (its folder and its name without a trailing ``-N`` /
  ``_N`` variant number, so ``frog.png`` and ``frog-1.png`` stay together) hashed with SHA-1; groups whose
  hash falls below ``val_fraction`` are validation. Adding stamps never moves an existing one.
- **Labels**: the top-level folder is the stamp's category (``class_name``); the categories listed in
  ``tuxpaint_classes.yaml`` beside this file (concrete ones: animals, clothes, food, household, plants,
  space, sports, vehicles) get a ``label`` and a ``labels.json`` / ``prompts.json`` in the Babel-ImageNet
  formats, with the class names translated by hand (ours; the stamps carry no translated category names)
  into the languages listed there, for ``vlm eval zeroshot``. The other categories (symbols, seasonal,
  town, ...) have no label.

Written under ``out``: ``train/`` and ``val/`` shard sets (each with the ``manifest.json`` of
:func:`vlm.data_recipes.build.build_samples`: per-language sample and caption counts, dropped captions and
skipped stamps with reasons), ``labels.json``, ``prompts.json`` and a top-level ``manifest.json`` (both
splits' counts, the per-language counts of each split, the duplicates dropped).
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

from vlm.data_recipes.build import BuildResult, build_samples, prepare_out_dir, write_json_atomic
from vlm.data_recipes.rows import RowError, parse_row
from vlm.errors import DataError

CLASSES_FILE = Path(__file__).with_name("tuxpaint_classes.yaml")
_VARIANT = re.compile(r"[-_]\d+$")
_MIRROR = re.compile(r"[-_](mirror|flip)$")


def read_description(path: Path) -> dict[str, list[str]]:
    """A stamp's ``.txt`` -> ``{locale as written: [captions]}`` (the first line under ``en``)."""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    lines = [ln.strip() for ln in text.split("\n")]
    caps: dict[str, list[str]] = {}
    first = next((ln for ln in lines if ln), None)
    if first is None:
        return caps
    caps["en"] = [first]
    for ln in lines[lines.index(first) + 1:]:
        if "=" not in ln:
            continue
        loc, cap = ln.split("=", 1)
        loc, cap = loc.strip(), cap.strip()
        if loc.lower().endswith((".utf8", ".utf-8")):
            loc = loc.rsplit(".", 1)[0]
        if loc and cap and cap not in caps.get(loc, []):
            caps.setdefault(loc, []).append(cap)
    return caps


def composite_on_white(path: Path):
    """Any PNG mode -> RGB on white, padded with white to a square (PIL image)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgba = im.convert("RGBA")  # palette (+ transparency index), LA, L, I;16 ... all go through RGBA
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    w, h = rgb.size
    side = max(w, h)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return square


def _image_keys(img) -> tuple[str, set[str]]:
    from PIL import ImageOps

    def h(i):
        return hashlib.sha1(i.tobytes()).hexdigest()
    return h(img), {h(ImageOps.mirror(img)), h(ImageOps.flip(img)), h(ImageOps.flip(ImageOps.mirror(img)))}


def split_of(rel: Path, val_fraction: float) -> str:
    """``"train"`` or ``"val"`` for a stamp at ``rel`` (relative path), fixed by its group's hash."""
    group = str(rel.parent / _VARIANT.sub("", rel.stem)).lower()
    x = int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if x < val_fraction else "train"


def load_classes() -> dict:
    """``tuxpaint_classes.yaml``: ``{"classes": [category...], "names": {lang: [name per class]},
    "prompts": {lang: [template with {}]}}``."""
    import yaml

    return yaml.safe_load(CLASSES_FILE.read_text(encoding="utf-8"))


def build_tuxpaint(stamps_dir, out_dir, *, val_fraction: float = 0.2, resize: int | None = 224,
                   overwrite: bool = False, strict_langs: bool = False, log=None, args: dict | None = None,
                   **opts) -> BuildResult:
    """Read a stamps folder (module docstring) and write ``out_dir/{train,val}`` + labels/prompts files.
    ``opts`` go to :func:`build_samples` (``max_count``, ``quality`` ...). Returns a BuildResult whose
    manifest is the top-level one (both splits)."""
    root = Path(stamps_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass the Tux Paint stamps folder (e.g. /usr/share/tuxpaint/stamps, "
                        f"or unpack it: apt-get download tuxpaint-stamps-default && dpkg-deb -x *.deb /tmp/tux)")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction}: must be between 0 and 1")
    pngs = sorted(root.rglob("*.png"))
    if not pngs:
        raise DataError(f"{root} holds no .png stamps; pass the stamps folder (its sub-folders are categories)")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        prepare_out_dir(out / split, split, overwrite)
    cls = load_classes()
    label_of = {c: i for i, c in enumerate(cls["classes"])}
    spool = Path(tempfile.mkdtemp(prefix="vlm-tuxpaint-"))
    items: dict[str, list] = {"train": [], "val": []}
    skipped, seen, seen_en, dupes = [], {}, {}, []
    try:
        for n, png in enumerate(pngs):
            rel = png.relative_to(root)
            txt = png.with_suffix(".txt")
            if not txt.is_file():
                base = _MIRROR.sub("", png.stem)
                mirrored = base != png.stem and (png.parent / f"{base}.png").is_file()
                skipped.append({"row": n, "reason": "mirrored_duplicate" if mirrored else "no_description",
                                "image": str(rel)})
                continue
            try:
                img = composite_on_white(png)
            except Exception as e:  # a PNG PIL cannot open: counted, the build goes on
                skipped.append({"row": n, "reason": "corrupt_image", "image": str(rel), "detail": f"{type(e).__name__}: {e}"})
                continue
            caps = read_description(txt)
            key, variants = _image_keys(img)
            first = (caps.get("en") or [""])[0]
            twin = seen.get(key) or next((seen[v] for v in variants if v in seen and seen_en[seen[v]] == first), None)
            if twin is not None:
                dupes.append({"image": str(rel), "same_as": twin})
                skipped.append({"row": n, "reason": "duplicate_image", "image": str(rel), "detail": f"= {twin}"})
                continue
            seen[key], seen_en[str(rel)] = str(rel), first
            tmp = spool / f"{n:06d}.png"
            img.save(tmp, format="PNG")
            category = rel.parts[0] if len(rel.parts) > 1 else ""
            row = {"image": str(tmp), "captions": caps, "stamp": str(rel), "category": category,
                   **({"label": label_of[category]} if category in label_of else {})}
            if category:
                row["class_name"] = category
            try:
                plan = parse_row(row, None, strict_langs=strict_langs)
            except RowError as e:
                skipped.append({"row": n, "reason": e.reason, "image": str(rel), "detail": e.detail})
                continue
            plan.captions = {k: list(dict.fromkeys(v)) for k, v in plan.captions.items()}  # de + de_DE: once
            items[split_of(rel, val_fraction)].append((n, plan, tmp))
        for txt in sorted(root.rglob("*.txt")):
            if not txt.with_suffix(".png").exists():
                skipped.append({"reason": "no_png", "image": str(txt.relative_to(root)),
                                "detail": "no PNG beside the description (an SVG-only stamp)"})
        results = {split: build_samples(items[split], out / split, source={"format": "tuxpaint", "path": str(root),
                                                                             "split": split},
                                        prefix=split, resize=resize, resize_mode="shorter", overwrite=overwrite,
                                        log=log, args=args, **opts)
                   for split in ("train", "val")}
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    labels = {lang.upper(): [list(range(len(names))), list(names)] for lang, names in cls["names"].items()}
    prompts = {lang.upper(): list(t) for lang, t in cls["prompts"].items()}
    lpath = write_json_atomic(out / "labels.json", labels)
    write_json_atomic(out / "prompts.json", prompts)
    from collections import Counter

    reasons = Counter(s["reason"] for s in skipped)
    tr, va = results["train"].manifest, results["val"].manifest
    manifest = {"format": "vlm-shards/1", "source": {"format": "tuxpaint", "path": str(root),
                                                     "val_fraction": val_fraction},
                "num_samples": tr["num_samples"] + va["num_samples"],
                "num_shards": tr["num_shards"] + va["num_shards"],
                "total_bytes": tr["total_bytes"] + va["total_bytes"],
                "splits": {"train": {"num_samples": tr["num_samples"], "langs": tr["langs"],
                                     "captions_per_lang": tr["captions_per_lang"], "labels": tr["labels"]},
                           "val": {"num_samples": va["num_samples"], "langs": va["langs"],
                                   "captions_per_lang": va["captions_per_lang"], "labels": va["labels"]}},
                "langs": dict(Counter(tr["langs"]) + Counter(va["langs"])),
                "dropped_captions": dict(Counter(tr["dropped_captions"]) + Counter(va["dropped_captions"])),
                "dropped_caption_langs": dict(Counter(tr["dropped_caption_langs"]) + Counter(va["dropped_caption_langs"])),
                "classes": cls["classes"], "labels_file": "labels.json", "prompts_file": "prompts.json",
                "duplicates": dupes,
                "num_skipped": len(skipped) + tr["num_skipped"] + va["num_skipped"],
                "skipped_reasons": dict(reasons + Counter(tr["skipped_reasons"]) + Counter(va["skipped_reasons"])),
                "skipped": skipped}
    mpath = write_json_atomic(out / "manifest.json", manifest)
    return BuildResult(out, results["train"].shards + results["val"].shards, manifest, mpath, lpath)


def split_spec(out_dir, split: str) -> str:
    """The shard spec (brace range) of one split written by :func:`build_tuxpaint`."""
    shards = sorted((Path(out_dir) / split).glob(f"{split}-*.tar"))
    if not shards:
        raise DataError(f"no {split} shards in {out_dir}; build them with vlm shards build --format tuxpaint")
    last = len(shards) - 1
    return str(Path(out_dir) / split / (f"{split}-{{000000..{last:06d}}}.tar" if last else shards[0].name))
