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


def test_several_captions_per_image(tmp_path):
    """captions_per_image=k: k positives per image, distinct languages first; text_to_image maps rows."""
    from vlm.tokenizers import ByteTokenizer

    caps = {"en": ["a red circle"], "de": ["ein roter Kreis"], "zh": ["红色的圆"], "hi": ["लाल वृत्त", "लाल गोला"]}
    with wds.TarWriter(str(tmp_path / "m-000.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": _jpg(i), "json": __import__("json").dumps({"captions": caps}).encode()})
        w.write({"__key__": "few", "jpg": _jpg(9), "json": b'{"captions": {"en": ["only one"]}}'})
    cfg = DataConfig(shards=str(tmp_path / "m-000.tar"), batch_size=5, num_workers=0, shuffle_buffer=0,
                     shuffle_shards=False, drop_last=False, captions_per_image=3)
    stream = make_loader(cfg, ImagePreprocess(image_size=8), ByteTokenizer(32), rank=0, world_size=1)
    (b,) = list(stream)
    assert b["pixels"].shape[0] == 5 and b["input_ids"].shape[0] == 15 and len(b["text"]) == 15
    assert b["text_to_image"].tolist() == [i for i in range(5) for _ in range(3)]
    for i in range(5):
        langs = b["text_lang"][3 * i: 3 * i + 3]
        assert len(set(langs)) == 3  # four languages available: three distinct ones are used
        assert all(t in caps[c] for t, c in zip(b["text"][3 * i: 3 * i + 3], langs))
    assert stream.skipped.get("too_few_captions") == 1
