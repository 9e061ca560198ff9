"""The ``image`` task: classification shards with no captions (ImageNet-style ``.cls`` members or json
``label``) stream every image with its class id; broken images are still skipped and counted."""
import io

import webdataset as wds
from PIL import Image

from vlm.data.wds import DataConfig, make_loader
from vlm.towers.base import ImagePreprocess


def _jpg(i):
    b = io.BytesIO()
    Image.new("RGB", (20, 20), (i * 40 % 256, 80, 120)).save(b, "JPEG")
    return b.getvalue()


def test_image_task_keeps_uncaptioned_samples(tmp_path):
    with wds.TarWriter(str(tmp_path / "cls-000.tar")) as w:
        for i in range(6):
            s = {"__key__": f"k{i}", "jpg": _jpg(i)}
            if i % 2:
                s["cls"] = str(i).encode()
            else:
                s["json"] = f'{{"label": {i}}}'.encode()
            w.write(s)
        w.write({"__key__": "bad", "jpg": b"not a jpeg", "cls": b"9"})
    cfg = DataConfig(shards=str(tmp_path / "cls-000.tar"), batch_size=4, num_workers=0, shuffle_buffer=0,
                     shuffle_shards=False, drop_last=False)
    stream = make_loader(cfg, ImagePreprocess(image_size=8), None, rank=0, world_size=1, task="image")
    got = {}
    for b in stream:
        assert b["pixels"].shape[1:] == (3, 8, 8)
        got.update(zip(b["key"], b["class_id"].tolist()))
    assert got == {f"k{i}": i for i in range(6)}
    assert stream.skipped.get("corrupt_image") == 1
    # the contrastive task needs captions: the same shard gives nothing usable
    stream = make_loader(cfg, ImagePreprocess(image_size=8), None, rank=0, world_size=1, task="contrastive")
    assert sum(len(b["key"]) for b in stream) == 0
    assert stream.skipped.get("missing_caption") == 7  # text is checked before the image is decoded
