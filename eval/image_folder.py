"""Image folders for evaluation: an ImageNet-style folder (``root/<class folder>/<image>``) read as batches of
uint8 pixels with class ids, through the project's loader decode (:mod:`vlm.data.decode`) or through
torchvision's PIL transforms (the geometry open_clip / timm evaluation uses, for agreement with
clip_benchmark). ``vlm eval zeroshot --image-folder`` and the benchmark-format readers
(:mod:`vlm.eval.benchmark_formats`) batch through :func:`folder_batches`; unreadable images are skipped and
counted, never fatal."""
from __future__ import annotations

import os

import torch

from vlm.errors import DataError, UserError


PREPROCESS_IMPLS = ("loader", "torchvision")
"""How :class:`ImageFolderDataset` applies the tower's preprocessing (see there)."""


def torchvision_geometry(decode_kw: dict):
    """PIL RGB image -> PIL RGB ``size x size``, as open_clip's / timm's evaluation transforms do it (before
    ``ToTensor``/``Normalize``, which the model step does on the uint8 pixels with the same arithmetic).
    ``decode_kw`` as from :func:`vlm.data.decode.decode_settings` (``size`` or ``image_size``)."""
    import math

    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    size = int(decode_kw.get("size", decode_kw.get("image_size")))
    interp = InterpolationMode.BILINEAR if decode_kw["interpolation"] == "bilinear" else InterpolationMode.BICUBIC
    mode, crop_pct = decode_kw["resize_mode"], float(decode_kw.get("crop_pct", 1.0) or 1.0)
    if mode == "shortest":  # open_clip: Resize(size) + CenterCrop(size); timm: Resize(floor(size / crop_pct))
        return Compose([Resize(math.floor(size / crop_pct) if crop_pct < 1 else size, interpolation=interp),
                        CenterCrop(size)])
    if mode == "squash":
        return Resize((size, size), interpolation=interp)
    from open_clip.transform import CenterCropOrPad, ResizeKeepRatio  # longest side + zero padding

    return Compose([ResizeKeepRatio(size, interpolation=interp, longest=1), CenterCropOrPad(size, fill=0)])


def _decode_torchvision(data: bytes, geometry, max_pixels: int) -> torch.Tensor:
    """Encoded bytes -> uint8 ``[3, S, S]`` through ``geometry`` (:func:`torchvision_geometry`): the file
    checks of :func:`vlm.data.decode.open_image` (formats, ``max_pixels``), then torchvision's
    ``pil_loader`` (``convert("RGB")``: alpha dropped, not composited) and the PIL transform."""
    import numpy as np

    from vlm.data.decode import SampleSkipped, open_image

    im = open_image(data, max_pixels)
    try:
        arr = np.array(geometry(im.convert("RGB")), dtype=np.uint8, copy=True)
    except OSError as e:
        raise SampleSkipped("truncated_image" if "truncated" in str(e).lower() else "corrupt_image", str(e)) from None
    except Exception as e:  # SyntaxError, ValueError, MemoryError from broken streams
        raise SampleSkipped("corrupt_image", f"{type(e).__name__}: {e}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise SampleSkipped("corrupt_image", f"decoded array shape {arr.shape}")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """An ImageNet-style folder (``root/<class folder>/<image>``) -> per image ``{"pixels": uint8 [3, S, S] |
    None, "class_id": int, "key": path, "skipped": reason | None}``.

    Folder names map to class ids through ``class_map`` ({folder: id}) or, without one, by sorted order
    (0, 1, ...). The tower's ``ImagePreprocess`` (size, resize_mode, interpolation, crop_pct) sets the
    geometry; ``preprocess_impl`` (:data:`PREPROCESS_IMPLS`) how it is done:

    * ``"loader"`` (default): the loader's own :func:`vlm.data.decode.decode_image`
      (``vlm.data.decode.decode_settings``), so a folder image gives exactly the pixels it gives inside a
      shard: crop-then-resize on uint8 tensors, JPEG draft decoding for large sources, alpha on white.
    * ``"torchvision"``: what ``torchvision.datasets.ImageFolder`` + open_clip's (and timm's) evaluation
      transform do, i.e. clip_benchmark's pixels: PIL ``convert("RGB")``, PIL resize of the shortest side
      (``floor(size / crop_pct)``, long side truncated) then center crop; ``squash`` / ``longest`` as open_clip.
      Resize-then-crop samples non-square images at slightly other positions than crop-then-resize (up to
      ~1 output pixel), so per-image scores differ a little; this mode reproduces clip_benchmark's top-1
      exactly (tests/test_clip_benchmark_agreement.py).

    ``keep_classes`` (ids): only the images of these classes are listed (and read). An unreadable image is
    not raised: ``skipped`` names the reason and :func:`folder_batches` counts it."""

    EXTS = (".jpg", ".jpeg", ".png", ".webp")
    preprocess_impl = "loader"
    _geometry = None  # the torchvision-mode PIL transform

    def __init__(self, root: str, preprocess, class_map: dict[str, int] | None = None,
                 preprocess_impl: str = "loader", keep_classes=None):
        if preprocess_impl not in PREPROCESS_IMPLS:
            raise UserError(f"unknown image preprocessing {preprocess_impl!r}; choose one of "
                            f"{', '.join(PREPROCESS_IMPLS)}")

        if not os.path.isdir(root):
            raise DataError(f"image folder not found: {root}. Give a folder with one sub-folder per class.")
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not folders:
            raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
        if class_map is None:
            class_map = {d: i for i, d in enumerate(folders)}
        missing = [d for d in folders if d not in class_map]
        if missing:
            raise DataError(f"class sub-folders {missing[:5]} of {root} are not in the class map; add them "
                            f"(JSON {{folder: class_id}}) or remove the folders")
        self.samples = [(os.path.join(root, d, f), int(class_map[d])) for d in folders
                        for f in sorted(os.listdir(os.path.join(root, d))) if f.lower().endswith(self.EXTS)]
        if not self.samples:
            raise DataError(f"no .jpg/.jpeg/.png/.webp images under {root}/<class>/")
        if keep_classes is not None:  # e.g. the evaluated languages' classes: the others are never decoded
            keep = {int(c) for c in keep_classes}
            self.samples = [s for s in self.samples if s[1] in keep]
        self._set_preprocess(preprocess, preprocess_impl)

    @classmethod
    def from_files(cls, paths: list[str], preprocess) -> "ImageFolderDataset":
        """Listed image files (no folder to scan) with ``class_id`` = their index, the loader's decode."""
        ds = cls.__new__(cls)
        ds.samples = [(p, i) for i, p in enumerate(paths)]
        ds._set_preprocess(preprocess, "loader")
        return ds

    def _set_preprocess(self, preprocess, preprocess_impl: str) -> None:
        from vlm.data.decode import decode_settings

        self.preprocess = preprocess
        self.decode_kw = decode_settings(preprocess)
        self.decode_kw["size"] = self.decode_kw.pop("image_size")
        self.preprocess_impl = preprocess_impl
        if preprocess_impl == "torchvision":
            self._geometry = torchvision_geometry(self.decode_kw)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from vlm.data.decode import SampleSkipped, decode_image

        path, cid = self.samples[i]
        out = {"pixels": None, "class_id": cid, "key": path, "skipped": None}
        try:
            with open(path, "rb") as f:
                data = f.read()
            if self._geometry is not None:
                out["pixels"] = _decode_torchvision(data, self._geometry, self.decode_kw["max_pixels"])
            else:
                out["pixels"] = decode_image(data, **self.decode_kw)
        except SampleSkipped as e:
            out["skipped"] = e.reason
        except OSError:  # vanished / unreadable file
            out["skipped"] = "missing_image"
        return out


def _folder_collate(items: list[dict]) -> dict:
    ok = [x for x in items if x["skipped"] is None]
    return {"pixels": torch.stack([x["pixels"] for x in ok]) if ok else None,
            "class_id": torch.tensor([x["class_id"] for x in ok], dtype=torch.long),
            "key": [x["key"] for x in ok], "skipped": [x["skipped"] for x in items if x["skipped"] is not None]}


def folder_batches(dataset: ImageFolderDataset, batch_size: int = 64, num_workers: int = 0, stats=None):
    """Batches ``{"pixels": uint8 [B, 3, S, S], "class_id": [B], "key": [paths]}`` over the folder, in
    order; unreadable images are left out and counted by reason in ``stats`` (a ``SkipStats``)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         collate_fn=_folder_collate)
    for b in loader:
        for reason in b.pop("skipped"):
            if stats is not None:
                stats.add(reason)
        if b["pixels"] is not None:
            yield b
