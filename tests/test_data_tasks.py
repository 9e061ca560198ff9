"""Every task through the one loader (vlm.data.tasks): VQA samples with workers, resampling, exact resume
and skip-and-count; a picklable collate_fn run in the workers; the one image preprocessing shared by the
loader and the evaluation folder reader."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.data.vqa import majority_answer
from vlm.data.wds import DataConfig, make_loader
from vlm.errors import UserError
from vlm.towers.base import ImagePreprocess

PRE = ImagePreprocess(image_size=8)


def _png(i: int, size=(20, 14)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, 80)).save(b, "PNG")
    return b.getvalue()


def _vqa_shards(d, n_shards=4, per_shard=6):
    """VQA shards; every 5th sample has captions only (no question: no_vqa)."""
    i = 0
    for s in range(n_shards):
        with wds.TarWriter(str(d / f"vqa-{s:03d}.tar")) as w:
            for _ in range(per_shard):
                if i % 5 == 4:
                    meta = {"captions": {"en": ["just a caption"]}}
                else:
                    meta = {"question": {"en": f"What is {i}?", "de": f"Was ist {i}?"},
                            "answers": {"en": [f"x{i}", f"y{i}", f"y{i}"], "de": [f"z{i}"]}}
                w.write({"__key__": f"q{i:04d}", "png": _png(i), "json": json.dumps(meta).encode()})
                i += 1
    return str(d / f"vqa-{{000..{n_shards - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return _vqa_shards(tmp_path_factory.mktemp("vqa"))


class PidCollate:
    """A picklable collate like a model's: strings and pixels in, a dict out, with the process it ran in."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, samples: list[dict]) -> dict:
        return {"pixels": torch.stack([s["pixels"] for s in samples]),
                "prompt": [f"{self.prefix} {s['question']}" for s in samples],
                "target": [s["target"] for s in samples], "lang": [s["lang"] for s in samples],
                "key": [s["key"] for s in samples], "answers": [s["answers"] for s in samples],
                "sample_keys": sorted(samples[0]), "pid": os.getpid()}


def test_vqa_task_with_workers_and_a_collate_in_the_worker(vqa):
    cfg = DataConfig(shards=vqa, batch_size=3, num_workers=2, shuffle_buffer=4, drop_last=False,
                     lang_weights={"de": 1.0, "en": 1.0})
    stream = make_loader(cfg, PRE, task="vqa", collate_fn=PidCollate("Q:"))
    batches = list(stream)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == 24 - 4 and stream.skipped == {"no_vqa": 4}
    assert all(b["pid"] != os.getpid() for b in batches) and len({b["pid"] for b in batches}) == 2
    assert {b["worker"] for b in batches} == {"rank0/worker0", "rank0/worker1"} and "skipped" in batches[0]
    assert {"pixels", "key", "url", "lang", "question", "answers", "target", "qa", "text", "class_id"} <= set(
        batches[0]["sample_keys"])
    for b in batches:
        assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape[1:] == (3, 8, 8)
        for p, t, a, lg in zip(b["prompt"], b["target"], b["answers"], b["lang"]):
            assert p.startswith("Q: What") == (lg == "en") and t == majority_answer(a)
    assert {lg for b in batches for lg in b["lang"]} == {"en", "de"}
    # the default collate: VQA fields, no prompt (the model decides it)
    b = next(iter(make_loader(DataConfig(shards=vqa, batch_size=2, num_workers=0), PRE, task="vqa")))
    assert {"question", "answers", "target", "qa", "lang", "key"} <= set(b) and "prompt" not in b
    with pytest.raises(UserError, match="collate_fn"):
        make_loader(cfg, PRE, task="vqa", collate_fn="not callable")
    with pytest.raises(UserError, match="unknown data task"):
        make_loader(cfg, PRE, task="vqa2")


def _flat(batches):
    return [(k, lg, t) for b in batches for k, lg, t in zip(b["key"], b["lang"], b["target"])]


@pytest.mark.parametrize("resampled", [False, True])
def test_vqa_exact_resume_per_worker(vqa, resampled):
    cfg = DataConfig(shards=vqa, batch_size=2, num_workers=2, shuffle_buffer=5, shuffle_initial=2, seed=7,
                     resampled=resampled, epoch_samples=16 if resampled else None)
    full = list(make_loader(cfg, PRE, task="vqa", collate_fn=PidCollate("Q:"), epoch=1))
    # resampled: epoch_samples 16 = 8 batches of 2; epoch mode: each worker's usable samples in pairs
    assert len(full) == 8 if resampled else 8 <= len(full) <= 10
    s = make_loader(cfg, PRE, task="vqa", collate_fn=PidCollate("Q:"), epoch=1)
    it = iter(s)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(s.state_dict()))
    del it
    rest = list(make_loader(cfg, PRE, task="vqa", collate_fn=PidCollate("Q:"), epoch=1, start_sample=state))
    assert _flat(head + rest) == _flat(full)
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(full[3:], rest))


def test_one_image_preprocessing_loader_and_folder(tmp_path):
    from vlm.data.decode import decode_image
    from vlm.eval.image_folder import ImageFolderDataset, folder_batches
    from vlm.data.decode import SkipStats

    rng = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8, generator=rng).numpy()
    (tmp_path / "imgs" / "cls").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "imgs" / "cls" / "a.png")
    (tmp_path / "imgs" / "cls" / "b.jpg").write_bytes(b"\xff\xd8 broken")
    data = (tmp_path / "imgs" / "cls" / "a.png").read_bytes()
    bic = decode_image(data, 16, interpolation="bicubic")
    bil = decode_image(data, 16, interpolation="bilinear")
    assert not torch.equal(bic, bil)
    assert not torch.equal(decode_image(data, 16, crop_pct=0.5), bic)
    with tarfile_writer(tmp_path / "s.tar") as w:
        w.write({"__key__": "a", "png": data, "json": json.dumps({"captions": {"en": "noise"}}).encode()})
    for interp, crop in (("bilinear", 1.0), ("bicubic", 1.0), ("bicubic", 0.875)):
        pre = ImagePreprocess(image_size=16, interpolation=interp, crop_pct=crop)
        shard_px = next(iter(make_loader(DataConfig(shards=str(tmp_path / "s.tar"), batch_size=1, num_workers=0),
                                         pre, task="image")))["pixels"][0]
        stats = SkipStats()
        folder = list(folder_batches(ImageFolderDataset(str(tmp_path / "imgs"), pre), batch_size=4, stats=stats))
        assert len(folder) == 1 and folder[0]["pixels"].shape == (1, 3, 16, 16)
        assert torch.equal(folder[0]["pixels"][0], shard_px)  # exactly the loader's pixels
        assert stats.as_dict() == {"corrupt_image": 1}  # counted, not raised
    with pytest.raises(UserError, match="interpolation"):
        ImageFolderDataset(str(tmp_path / "imgs"), ImagePreprocess(image_size=16, interpolation="nearest"))


def tarfile_writer(path):
    return wds.TarWriter(str(path))
