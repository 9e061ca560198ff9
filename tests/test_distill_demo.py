"""``vlm demo --distill --quick``: the whole distillation demo at smoke-test size (teacher trained here, both
students, every evaluation, the Markdown report)."""
import json

from vlm.cli import main


def test_vlm_demo_distill_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--distill", "--quick", "--out", str(out), "--no-progress", "--workers", "0", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "vlm demo --distill finished" in printed and "## DHO image student" in printed
    assert "Two-language text student (en+zh)" in printed
    rep = json.loads((out / "distill" / "report.json").read_text(encoding="utf-8"))
    assert set(rep["dho"]) == {"mixed", "ce", "kd"} and set(rep["text"]["student"]["zeroshot"]) == {"en", "zh"}
    sp = rep["speed"]
    assert sp["image_params"]["student"] < sp["image_params"]["teacher"]
    assert sp["text_params"]["student"] < sp["text_params"]["teacher"]
    assert all(v[0] > 0 for v in sp["images_per_s"].values())
    for sub in ("dho", "ce_only", "text"):
        assert (out / "distill" / sub / "final" / "model.safetensors").is_file()
