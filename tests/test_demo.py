"""The main job end to end in its reduced setting: ``vlm demo --quick`` builds the demo shards, pretrains,
evaluates zero-shot + retrieval in every demo language, fine-tunes the vision-LLM stage and writes the
reports (JSON, Markdown, PNG). Accuracy is not asserted here (a few steps); the full run's is in the README."""
import json

import pytest

from vlm.cli import main


@pytest.mark.slow
def test_vlm_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "vlm demo finished" in printed and str(out / "report") in printed
    report = out / "report"
    for name in ("zeroshot-translated", "retrieval", "vlm-caption-vs-blind"):
        for ext in ("json", "md", "png"):
            assert (report / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    zs = json.loads((report / "zeroshot-translated.json").read_text(encoding="utf-8"))
    langs = set(zs["per_language"])
    assert len(langs) >= 12 and {"ar", "hi", "zh", "ru", "en"} <= langs
    for row in zs["per_language"].values():
        assert row["top1_chance"] == pytest.approx(10.0) and row["n_classes"] == 10  # percentages
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["quick"] is True and summary["train"]["step"] == 6
    # a second run reuses the data and resumes the finished run instead of training again
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--workers", "0", "--skip-vlm"]) == 0
