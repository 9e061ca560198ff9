"""vlm eval tokenizer: reconstruction PSNR/SSIM, codebook usage, zero-shot retention against the teacher."""
import json

import pytest
import torch

from vlm import registry
from vlm.cli import main
from vlm.model import DualEncoder, DualEncoderConfig


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=16, val=20, size=32, train_shards=1, val_shards=1)


def test_eval_tokenizer_reports_reconstruction_and_retention(demo, tmp_path):
    torch.manual_seed(0)
    de = DualEncoder.from_config(DualEncoderConfig(image_tower="tiny:vit", text_tower="tiny:text",
                                                   text_tower_cfg={"context_length": 32}))
    de.save_pretrained(tmp_path / "dual")
    tok = registry.build("tower", f"dualtoken:vlm:{tmp_path / 'dual'}", codebook_size=16, depth=2, code_dim=8,
                         decoder_channels=16)
    tok.train()
    tok(torch.randn(4, 3, 32, 32))
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "report"
    assert main(["eval", "tokenizer", "--model", str(tmp_path / "tok"), "--images", demo.val_spec,
                 "--dual-encoder", str(tmp_path / "dual"), "--langs", "en,de", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "tokenizer.json").read_text())
    m = rep["summary"]
    assert m["n_images"] == 20 and m["psnr"] > 0 and -1 <= m["ssim"] <= 1
    assert 0 < m["pixel_usage"] <= 1 and m["semantic_perplexity"] >= 1
    assert set(rep["per_language"]) == {"en", "de"}
    row = rep["per_language"]["de"]
    assert {"top1_teacher", "top1_quantised", "retention"} <= set(row)
    assert rep["warnings"] == []  # the dual encoder's image tower is the tokenizer's teacher
    assert (out / "tokenizer_grid.png").is_file() and (out / "tokenizer.md").is_file()
    md = (out / "tokenizer.md").read_text()
    assert "| top1_teacher | top1_quantised | retention |" in md and "| psnr | ssim | n_images |" in md


def test_eval_tokenizer_bad_model_is_one_line(demo, tmp_path, capsys):
    assert main(["eval", "tokenizer", "--model", str(tmp_path), "--images", demo.val_spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dualtoken.json" in err
