"""Multilingual retrieval benchmarks in their published formats -> one list of images with captions.

Every reader takes the annotation files as published plus a local image folder and returns a
:class:`BenchmarkItems` (a list) of ``{"image": absolute path, "key": the benchmark's image id,
"captions": {lang: [caption, ...]}}``, one entry per distinct image (captions of the same image in
several files or lines are merged), in first-seen order. Language codes go through
:func:`vlm.data.langs.normalize_lang` (plus the aliases of :data:`LANG_ALIASES`: XTD10 writes ``jp``);
captions are stripped, empty ones dropped. Images that are not found are left out and listed in
``items.missing`` (with the count in the report); none found at all is a :class:`DataError` naming the
folder and an expected file. A file that does not have the documented layout is a DataError naming the
file, the line and the fields it has.

Formats (``--format``; ``--annotations PATH``, ``--images DIR``):

* ``xm3600`` (Crossmodal-3600): ``captions.jsonl`` (or the folder holding it), one object per image:
  ``{"image/key": "<hex id>", "<lang>": {"caption": [...], "caption/tokenized": [...], ...}, ...}``.
  The id field may also be ``image_key`` / ``key`` / ``image_id`` / ``id``; a language value may also be
  a plain list or string of captions; other ``image/...`` fields and scalar metadata are ignored. Images:
  ``DIR/<key>.jpg``.
* ``xtd10``: ``test_1kcaptions_<lang>.txt`` (one caption a line), aligned line by line with
  ``test_image_names.txt`` (one image file name a line). PATH is the folder, or one caption file (only
  that language). The image list is looked for beside the captions and one folder up, or given as
  ``image_list``. ``test_1k_captions_<lang>.txt`` is accepted too.
* ``multi30k``: ``<split>.<lang>`` caption files (``test_2016_flickr.en``, ``val.de``,
  ``test_2017_flickr.fr``, ``test_2016_flickr.lc.norm.tok.cs``; ``.gz`` too), one caption a line, aligned
  with the split's image list. PATH is a caption file (its siblings with the same stem and another
  language are read too), the stem itself (``raw/test_2016_flickr``) or a folder holding one split. The
  image list is ``image_list`` or found as ``<stem>.images``, ``<split>.images``, ``<split>_images.txt``,
  ``test_2016_images.txt`` (for ``test_2016_flickr``), ``image_splits/<split>.txt`` or ``<split>.txt``
  beside the captions or up to two folders up (the dataset repository's ``data/task1/image_splits``).
* ``xflickrco`` (IGLUE xFlickr&CO): per language ``<lang>/test.jsonl`` (PATH: the ``annotations``
  folder, the dataset folder holding ``annotations/``, or one file; a flat ``<lang>.jsonl`` /
  ``test_<lang>.jsonl`` works too), rows with the image in ``img_path`` (or ``image_path``, ``image``,
  ``image_id``, ``img_id``, ``file_name``, ``filename``) and captions in ``sentences`` (a list, or
  ``captions`` / ``caption`` / ``sentence``). The language is the folder or file name, or a row's
  ``lang``.

Image references resolve against DIR: the path as given, then (one recursive walk of DIR, made once)
the file name, the file name without extension, and the number of a numbered name (COCO's
``COCO_val2014_000000391895.jpg`` = ``000000391895.jpg`` = image id ``391895``), each only where it is
unambiguous. :func:`image_batches` feeds the items to ``eval.zeroshot.embed_images`` (each image decoded
by the loader's own ``decode_image`` with the model's preprocessing, once).
"""
from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

from vlm.errors import DataError

FORMATS = ("xm3600", "xtd10", "multi30k", "xflickrco")
LANG_ALIASES = {"jp": "ja", "cz": "cs", "gr": "el", "dk": "da", "kr": "ko", "cn": "zh", "ua": "uk", "se": "sv"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_ID_FIELDS = ("image/key", "image_key", "key", "image_id", "id")
_IMG_FIELDS = ("img_path", "image_path", "image", "image_id", "img_id", "file_name", "filename")
_CAP_FIELDS = ("sentences", "captions", "caption", "sentence")


class BenchmarkItems(list):
    """The images of a benchmark (``{"image", "key", "captions"}`` dicts) + what could not be used."""

    def __init__(self, items=(), *, format: str = "", missing: list[str] | None = None, source: str = ""):
        super().__init__(items)
        self.format, self.missing, self.source = format, list(missing or []), source

    @property
    def langs(self) -> list[str]:
        return sorted({lang for it in self for lang in it["captions"]})


def lang_code(code: str, where: str) -> str:
    """A benchmark's language code -> the project's code (:data:`LANG_ALIASES`, then ``normalize_lang``)."""
    from vlm.data.langs import UnknownLanguage, normalize_lang

    c = str(code).strip()
    try:
        return normalize_lang(LANG_ALIASES.get(c.lower(), c))
    except UnknownLanguage as e:
        raise DataError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------ images
# a numbered image name: all digits (Flickr ids, 000000391895) or a word prefix + "_" + digits (COCO_val2014_...)
_NUMBERED = re.compile(r"^(?:[a-z][a-z0-9_]*_)?(\d+)$")


class ImageIndex:
    """Resolves a benchmark's image reference to a file under ``root`` (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist (--images DIR: the benchmark's images)")
        self._maps = None

    def _build(self):
        by_name, by_stem, by_num = {}, {}, {}
        for d, _, files in os.walk(self.root):
            for f in files:
                if not f.lower().endswith(IMAGE_EXTS):
                    continue
                p = os.path.join(d, f)
                stem = os.path.splitext(f)[0].lower()
                for m, k in ((by_name, f.lower()), (by_stem, stem)):
                    m[k] = None if k in m else p  # None marks an ambiguous name
                num = _NUMBERED.match(stem)
                if num:
                    k = int(num.group(1))
                    by_num[k] = None if k in by_num else p
        self._maps = by_name, by_stem, by_num

    def resolve(self, ref) -> str | None:
        ref = str(ref).strip()
        if not ref:
            return None
        for cand in (self.root / ref, self.root / (ref + ".jpg")):  # an absolute ref stays itself
            if cand.is_file():
                return str(cand.resolve())
        if self._maps is None:
            self._build()
        by_name, by_stem, by_num = self._maps
        name = os.path.basename(ref.replace("\\", "/")).lower()
        stem = os.path.splitext(name)[0] if name.endswith(IMAGE_EXTS) else name
        hit = by_name.get(name) or by_stem.get(stem)
        if hit is None:
            num = _NUMBERED.match(stem)
            hit = by_num.get(int(num.group(1))) if num else None
        return str(Path(hit).resolve()) if hit else None


class _Collector:
    """Merges (image ref, lang, captions) into items keyed by the resolved image."""

    def __init__(self, images, fmt: str, source):
        self.index, self.fmt, self.source = ImageIndex(images), fmt, str(source)
        self.items: dict[str, dict] = {}
        self.missing: dict[str, None] = {}

    def add(self, ref, lang: str, captions) -> None:
        caps = [c.strip() for c in ([captions] if isinstance(captions, str) else captions) if c and c.strip()]
        ref = str(ref).strip()
        path = self.index.resolve(ref)
        if path is None:
            self.missing[ref] = None
            return
        it = self.items.setdefault(path, {"image": path, "key": ref, "captions": {}})
        if caps:
            it["captions"].setdefault(lang, []).extend(caps)

    def result(self) -> BenchmarkItems:
        items = [it for it in self.items.values() if it["captions"]]
        if not items:
            example = next(iter(self.missing), None)
            why = (f"none of the {len(self.missing)} images it names is in {self.index.root} (e.g. {example!r})"
                   if example else "it holds no captions")
            raise DataError(f"{self.fmt} annotations {self.source}: {why}; check --annotations and --images")
        return BenchmarkItems(items, format=self.fmt, missing=list(self.missing), source=self.source)


# ------------------------------------------------------------------------------------------ helpers
def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (``.gz`` too), trailing blank lines dropped (alignment is kept)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _jsonl(path: Path):
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n}: not JSON ({e.msg}); expected one JSON object a line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: not a JSON object")
        yield n, row


def _exists(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"annotations {p} do not exist (--annotations: the benchmark's files as published)")
    return p


def _find_list(candidates: list[Path], what: str, explicit=None) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise DataError(f"image list {p} does not exist")
        return p
    for c in candidates:
        if c.is_file():
            return c
    shown = ", ".join(str(c) for c in candidates[:6])
    raise DataError(f"no image list for {what}: looked for {shown}; pass it with --image-list FILE")


def _aligned(caps: Path, names: list[str], image_list: Path) -> list[str]:
    lines = _lines(caps)
    if len(lines) != len(names):
        raise DataError(f"{caps} has {len(lines)} lines but the image list {image_list} has {len(names)}; "
                        "the files must be aligned line by line (same split?)")
    return lines


# ------------------------------------------------------------------------------------------ readers
def read_xm3600(annotations, images) -> BenchmarkItems:
    """Crossmodal-3600 ``captions.jsonl`` (or its folder) + the folder of ``<key>.jpg``."""
    p = _exists(annotations)
    if p.is_dir():
        p = p / "captions.jsonl"
        if not p.is_file():
            raise DataError(f"{p.parent} holds no captions.jsonl (the XM3600 annotation file)")
    col = _Collector(images, "xm3600", p)
    for n, row in _jsonl(p):
        key = next((row[f] for f in _ID_FIELDS if isinstance(row.get(f), (str, int))), None)
        if key is None:
            raise DataError(f"{p} line {n}: no image id (one of {', '.join(_ID_FIELDS)}); fields: {sorted(row)[:8]}")
        for field, value in row.items():
            if field in _ID_FIELDS or field.startswith("image/") or not isinstance(value, (dict, list)):
                continue
            if isinstance(value, dict):
                if "caption" not in value:
                    raise DataError(f"{p} line {n}: language {field!r} has no 'caption' list "
                                    f"(fields: {sorted(value)[:6]})")
                value = value["caption"]
            if isinstance(value, str):
                value = [value]
            if not all(isinstance(c, str) for c in value):
                raise DataError(f"{p} line {n}: captions of {field!r} must be strings")
            col.add(key, lang_code(field, f"{p} line {n}"), value)
    return col.result()


_XTD = re.compile(r"^test_1k_?captions_([A-Za-z]{2,3}(?:[-_][A-Za-z]{2,4})?)\.txt$", re.I)


def read_xtd10(annotations, images, image_list=None) -> BenchmarkItems:
    """XTD10 ``test_1kcaptions_<lang>.txt`` files aligned with ``test_image_names.txt``."""
    p = _exists(annotations)
    files = sorted(f for f in p.iterdir() if _XTD.match(f.name)) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{p} holds no test_1kcaptions_<lang>.txt files (the XTD10 caption files)")
    bad = [f for f in files if not _XTD.match(f.name)]
    if bad:
        raise DataError(f"{bad[0]}: not an XTD10 caption file name (test_1kcaptions_<lang>.txt)")
    folder = files[0].parent
    lst = _find_list([folder / "test_image_names.txt", folder.parent / "test_image_names.txt"],
                     f"XTD10 in {folder}", image_list)
    names = _lines(lst)
    col = _Collector(images, "xtd10", p)
    for f in files:
        lang = lang_code(_XTD.match(f.name).group(1), str(f))
        for name, cap in zip(names, _aligned(f, names, lst)):
            col.add(name, lang, [cap])
    return col.result()


_M30K = re.compile(r"^(.+?)\.([A-Za-z]{2,3})(\.gz)?$")
# file extensions that are also ISO 639-3 codes: never read as a caption file's language
_NOT_LANG = frozenset({"txt", "csv", "tsv", "yml", "cfg", "log", "tar", "ids", "bpe", "sh", "out", "err", "bak",
                       "tmp", "dat", "ini", "src", "ref", "hyp", "img", "lst", "doc", "xml", "pdf", "jpg", "png"})


def _m30k_lang(name: str):
    """``(stem, lang)`` of a caption file name ``<stem>.<lang>[.gz]``, else None."""
    m = _M30K.match(name)
    if not m or m.group(2).lower() in _NOT_LANG:
        return None
    from vlm.data.langs import is_known

    return (m.group(1), m.group(2)) if is_known(LANG_ALIASES.get(m.group(2).lower(), m.group(2))) else None


def read_multi30k(annotations, images, image_list=None) -> BenchmarkItems:
    """Multi30K ``<split>.<lang>`` caption files aligned with the split's image list."""
    p = Path(annotations).expanduser()
    if p.is_file():
        hit = _m30k_lang(p.name)
        if not hit:
            raise DataError(f"{p}: not a Multi30K caption file name (<split>.<lang>, e.g. test_2016_flickr.en)")
        folder, stem = p.parent, hit[0]
    elif p.is_dir():
        stems = sorted({h[0] for f in p.iterdir() if f.is_file() and (h := _m30k_lang(f.name))})
        if len(stems) != 1:
            raise DataError(f"{p} holds {'no' if not stems else 'several'} Multi30K splits"
                            f"{' (' + ', '.join(stems) + ')' if stems else ''}; pass one caption file "
                            f"(e.g. {p}/test_2016_flickr.en) or the split's stem")
        folder, stem = p, stems[0]
    elif p.parent.is_dir():
        folder, stem = p.parent, p.name
    else:
        raise DataError(f"annotations {p} do not exist (a Multi30K caption file such as test_2016_flickr.en)")
    files = sorted(f for f in folder.iterdir() if f.is_file() and (h := _m30k_lang(f.name)) and h[0] == stem)
    if not files:
        raise DataError(f"no caption files {folder}/{stem}.<lang> (Multi30K: one caption a line)")
    split = stem.split(".")[0]
    names = [f"{stem}.images", f"{split}.images", f"{split}_images.txt",
             f"{split.replace('_flickr', '')}_images.txt", f"image_splits/{split}.txt", f"{split}.txt"]
    dirs = [folder, folder.parent, folder.parent.parent]
    lst = _find_list([d / n for d in dirs for n in names], f"Multi30K split {split!r}", image_list)
    imgs = _lines(lst)
    col = _Collector(images, "multi30k", p)
    for f in files:
        lang = lang_code(_m30k_lang(f.name)[1], str(f))
        for name, cap in zip(imgs, _aligned(f, imgs, lst)):
            col.add(name, lang, [cap])
    return col.result()


_XF_FLAT = re.compile(r"^(?:[A-Za-z]+[_-])?([A-Za-z]{2,3})\.jsonl$")


def _xflickrco_files(p: Path) -> list[tuple[Path, str | None]]:
    if p.is_file():
        m = _XF_FLAT.match(p.name) if p.name.lower() != "test.jsonl" else None
        lang = m.group(1) if m else p.parent.name
        return [(p, lang)]
    if (p / "annotations").is_dir():
        p = p / "annotations"
    out = []
    for d in sorted(x for x in p.iterdir() if x.is_dir()):
        cands = [d / "test.jsonl"] if (d / "test.jsonl").is_file() else sorted(d.glob("*.jsonl"))
        if len(cands) > 1:
            raise DataError(f"{d} holds several .jsonl files ({', '.join(c.name for c in cands[:4])}); "
                            "pass the one to read")
        out += [(c, d.name) for c in cands]
    out += [(f, m.group(1)) for f in sorted(p.glob("*.jsonl")) if (m := _XF_FLAT.match(f.name))]
    if not out:
        raise DataError(f"{p} holds no <lang>/test.jsonl files (IGLUE xFlickrCO annotations)")
    return out


def read_xflickrco(annotations, images) -> BenchmarkItems:
    """IGLUE xFlickrCO: per language ``<lang>/test.jsonl`` rows ``{img_path | image_id, sentences}``."""
    p = _exists(annotations)
    col = _Collector(images, "xflickrco", p)
    for f, folder_lang in _xflickrco_files(p):
        for n, row in _jsonl(f):
            ref = next((row[k] for k in _IMG_FIELDS if isinstance(row.get(k), (str, int))), None)
            caps = next((row[k] for k in _CAP_FIELDS if row.get(k) is not None), None)
            if ref is None or caps is None:
                raise DataError(f"{f} line {n}: needs an image ({'/'.join(_IMG_FIELDS[:4])}) and captions "
                                f"({'/'.join(_CAP_FIELDS)}); fields: {sorted(row)[:8]}")
            if isinstance(caps, str):
                caps = [caps]
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataError(f"{f} line {n}: captions must be a string or a list of strings")
            lang = row.get("lang") or folder_lang
            col.add(ref, lang_code(lang, f"{f} line {n} (language from the folder/file name or 'lang')"), caps)
    return col.result()


READERS = {"xm3600": read_xm3600, "xtd10": read_xtd10, "multi30k": read_multi30k, "xflickrco": read_xflickrco}


def read_benchmark(fmt: str, annotations, images, image_list=None) -> BenchmarkItems:
    """Dispatch to the reader of ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in READERS:
        raise DataError(f"unknown benchmark format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if annotations is None or images is None:
        raise DataError(f"--format {fmt} needs --annotations PATH (the published files) and --images DIR")
    if image_list is not None and fmt not in ("xtd10", "multi30k"):
        raise DataError(f"--image-list is for xtd10 and multi30k (their captions are aligned with it), not {fmt}")
    kw = {"image_list": image_list} if fmt in ("xtd10", "multi30k") else {}
    return READERS[fmt](annotations, images, **kw)


# ------------------------------------------------------------------------------------------ embedding
def image_batches(items: BenchmarkItems, preprocess, batch_size: int = 64, num_workers: int = 0, stats=None):
    """Batches ``{"pixels", "class_id" (= index into items), "key"}`` for ``eval.zeroshot.embed_images``;
    unreadable images are left out and counted in ``stats`` (a ``SkipStats``)."""
    from vlm.eval.image_folder import ImageFolderDataset, folder_batches

    ds = ImageFolderDataset.from_files([it["image"] for it in items], preprocess)
    return folder_batches(ds, batch_size, num_workers, stats)
