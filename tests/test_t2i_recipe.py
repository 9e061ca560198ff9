"""task: t2i through vlm train (loss falls, killed-and-resumed = uninterrupted, unconditional baseline),
``vlm generate-image`` (writes a PNG; bad arguments are one line, exit 2) and ``vlm eval t2i``."""
import json

import pytest
import torch

from vlm.cli import main as vlm_main
from vlm.config import load_config
from vlm.train.cli import CONFIG_DIR
from vlm.train.t2i import T2ITrainConfig, run

TOWER = "{backbone_cfg: {width: 32, depth: 2, image_size: 32, patch_size: 8}, pixel_block: 1, shortcut_block: 1, " \
        "semantic_block: 1, code_dim: 8, codebook_size: 16, depth: 2, decoder_channels: 16}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=48, val=10, size=32, train_shards=2, val_shards=1,
                      langs=["en", "de"])


def _cfg(demo, run_dir, *extra):
    return load_config(T2ITrainConfig, CONFIG_DIR / "t2i_demo.yaml", [
        f"data.shards={demo.train_spec}", f"val_data.shards={demo.val_spec}", f"train.run_dir={run_dir}",
        "mix.languages=[en, de]", f"model.tower_cfg={TOWER}", "model.llm_cfg={hidden_size: 32, num_layers: 1}",
        "model.head_width=32", "model.head_layers=1", "data.batch_size=4", "data.num_workers=0",
        "data.shuffle_buffer=8", "val_data.batch_size=5", "val_batches=1", "train.steps=4", "train.ckpt_every=2",
        "train.log_every=1", "optim.warmup_steps=1", "optim.lr=3e-3", "train.progress=false",
        "train.tensorboard=false", "model.cond_dropout=0.5", *extra])


def _weights(d):
    from safetensors.torch import load_file

    w = load_file(str(d / "t2i.safetensors"))
    w.update({f"llm/{k}": v for k, v in load_file(str(d / "llm" / "model.safetensors")).items()})
    return w


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    return run(_cfg(demo, tmp / "full")), tmp


def test_loss_falls_and_the_model_loads(trained):
    summary, _ = trained
    assert summary["step"] == 4 and summary["loss"] < summary["first_loss"]
    assert summary["val_loss"] is not None
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl", encoding="utf-8")]
    assert any("t2i/pixel_acc" in r for r in rows)


def test_killed_and_resumed_run_equals_the_uninterrupted_one(demo, trained):
    from pathlib import Path

    summary, tmp = trained
    stopped = run(_cfg(demo, tmp / "resumed", "train.stop_after=2"))
    assert stopped["final_dir"] is None and stopped["step"] == 2
    resumed = run(_cfg(demo, tmp / "resumed", "train.resume=latest"))
    a, b = _weights(Path(summary["final_dir"])), _weights(Path(resumed["final_dir"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_unconditional_baseline_trains_on_empty_prompts(demo, tmp_path):
    from vlm.vision_llm.t2i import TextToImage

    summary = run(_cfg(demo, tmp_path / "uncond", "unconditional=true", "train.steps=2"))
    model = TextToImage.from_pretrained(summary["final_dir"])
    assert model.config.unconditional and model.config.cond_dropout == 0.0
    from vlm.vision_llm.t2i_heads import Sampling

    s = Sampling(temperature=0)
    a = model.generate_codes(["ein roter Kreis"], "de", sampling=s)
    b = model.generate_codes(["a blue star on green"], "en", sampling=s)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the prompt is ignored


def test_generate_image_cli_writes_a_png_and_bad_args_are_one_line(trained, tmp_path, capsys):
    from PIL import Image

    summary, _ = trained
    model = summary["final_dir"]
    out = tmp_path / "kreis.png"
    assert vlm_main(["generate-image", "ein roter Kreis", "--lang", "de", "--model", model, "--out", str(out),
                     "--num-images", "3", "--guidance", "2", "--top-k", "5", "--seed", "1"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 32  # a 3-image grid
    single = tmp_path / "one.png"
    assert vlm_main(["generate-image", "a circle", "--model", model, "--out", str(single), "--temperature", "0",
                     "--no-cache", "--scale", "2"]) == 0
    with Image.open(single) as im:
        assert im.size == (64, 64)
    capsys.readouterr()
    for bad in (["--lang", "zz"], ["--out", str(tmp_path / "x.jpg")], ["--top-p", "0"], ["--temperature", "-1"],
                ["--num-images", "0"], ["--model", str(tmp_path / "missing")], ["--model", str(tmp_path)]):
        args = ["generate-image", "x", "--model", model, "--out", str(tmp_path / "x.png")]
        for i in range(0, len(bad), 2):
            j = args.index(bad[i]) if bad[i] in args else None
            if j is None:
                args += bad[i:i + 2]
            else:
                args[j + 1] = bad[i + 1]
        assert vlm_main(args) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("vlm generate-image: error:") and "\n" not in err and "Traceback" not in err, err


def test_eval_t2i_reports_per_language_with_a_grid(trained, demo, tmp_path, capsys):
    from vlm.model import DualEncoder

    summary, _ = trained
    torch.manual_seed(0)
    clf = DualEncoder.from_config({"image_tower": "tiny:vit", "image_tower_cfg": {"width": 32, "depth": 1},
                                   "text_tower": "ngram:text", "text_tower_cfg": {"width": 32, "buckets": 512}})
    clf_dir = clf.save_pretrained(tmp_path / "clf")
    out = tmp_path / "ev"
    rc = vlm_main(["eval", "t2i", "--model", summary["final_dir"], "--classifier", str(clf_dir), "--labels",
                   str(demo.labels), "--prompts", str(demo.prompts), "--per-class", "1", "--baseline",
                   summary["final_dir"], "--out", str(out), "--batch-size", "8"])
    assert rc == 0
    rep = json.loads((out / "t2i.json").read_text(encoding="utf-8"))
    assert set(rep["per_language"]) == {"en", "de"}
    for r in rep["per_language"].values():
        assert r["n"] == 10 and r["accuracy_chance"] == pytest.approx(10.0)
        assert 0 <= r["accuracy"] <= 100 and r["accuracy_baseline"] == r["accuracy"]  # same model, same seeds
    assert (out / "t2i-grid.png").is_file() and (out / "t2i.md").is_file()
    capsys.readouterr()
    assert vlm_main(["eval", "t2i", "--model", summary["final_dir"], "--classifier", str(clf_dir), "--labels",
                     str(demo.labels), "--langs", "xx", "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err
