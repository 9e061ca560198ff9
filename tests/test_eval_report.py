"""Reports: JSON + Markdown + PNG per eval, comparison table, `vlm eval` sub-commands that need no model."""
import json

import pytest

from vlm.eval.report import compare_reports, load_report, to_markdown, write_report
from vlm.errors import DataError


def _results(top1_de, top1_zh, chance_zh=10.0):
    per = {"de": {"n_images": 20, "n_classes": 5, "top1": top1_de, "top1_chance": 20.0, "top5": 100.0,
                  "top5_chance": 100.0},
           "zh": {"n_images": 30, "n_classes": 10, "top1": top1_zh, "top1_chance": chance_zh, "top5": 90.0,
                  "top5_chance": 50.0},
           "br": {"n_images": 0, "n_classes": 3, "top1": None, "top1_chance": 33.3, "top5": None,
                  "top5_chance": 100.0}}
    return {"task": "zeroshot", "mode": "translated", "primary_metric": "top1", "metrics": ["top1", "top5"],
            "per_language": per, "summary": {"mean_top1": (top1_de + top1_zh) / 2, "mean_top1_chance": 15.0},
            "warnings": ["BR: no image of its 3 classes; not scored"]}


def test_write_report_files(tmp_path):
    paths = write_report(_results(55.0, 42.5), str(tmp_path / "out"), "run1",
                         {"model": "runs/a/final", "data": "val/", "prompts": "prompts.json"})
    rep = json.loads(open(paths["json"], encoding="utf-8").read())
    assert rep["name"] == "run1" and rep["per_language"]["de"]["top1"] == 55.0
    assert rep["metadata"]["model"] == "runs/a/final" and rep["metadata"]["versions"]["torch"]
    assert rep["metadata"]["date"].endswith("+00:00")
    md = open(paths["markdown"], encoding="utf-8").read()
    assert "| de | 20 | 5 | 55.00 (20.00) | 100.00 (100.00) |" in md
    assert "| br | 0 | 3 | – | – |" in md and "**mean**" in md and "BR: no image" in md
    with open(paths["png"], "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 600 and im.size[1] > 300
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert "Cells: value (chance level)" in md
    other = write_report({**_results(55.0, 42.5), "baseline_label": "image-blind baseline"}, str(tmp_path / "out"),
                         "run2", {})
    assert "Cells: value (image-blind baseline)" in open(other["markdown"], encoding="utf-8").read()


def test_compare_reports(tmp_path):
    a = write_report(_results(55.0, 42.5), str(tmp_path), "base")["json"]
    b = write_report(_results(60.0, 40.0), str(tmp_path), "tuned")["json"]
    c = write_report(_results(61.0, 30.0, chance_zh=5.0), str(tmp_path), "other")["json"]
    md = compare_reports([a, b])
    assert "| lang | chance | base | tuned |" in md
    assert "| de | 20.00 | 55.00 | **60.00** |" in md
    assert "| zh | 10.00 | **42.50** | 40.00 |" in md
    assert "| br | 33.30 | – | – |" in md
    assert "| **mean (2 common)** | 15.00 | 48.75 | **50.00** |" in md
    md2 = compare_reports([a, c], metric="top5")
    assert "| lang | chance | base | other |" in md2
    md3 = compare_reports([a, c])  # chance differs for zh: no single chance value for that row
    assert "| zh | – | **42.50** | 30.00 |" in md3
    with pytest.raises(DataError, match="metric 'bleu' is not in"):
        compare_reports([a, b], metric="bleu")
    with pytest.raises(DataError, match="not found"):
        load_report(str(tmp_path / "missing.json"))


def test_markdown_without_chance():
    res = {"task": "vqa", "primary_metric": "vqa_accuracy", "metrics": ["vqa_accuracy"],
           "per_language": {"en": {"n": 3, "vqa_accuracy": 70.0}}, "summary": {"mean_vqa_accuracy": 70.0}}
    md = to_markdown({"name": "v", **res})
    assert "| en | 3 | 70.00 |" in md and "(chance" not in md and "0-100 scale" in md


def test_cli_metrics_and_compare(tmp_path, capsys):
    from vlm.cli import main

    rows = [{"id": i, "lang": "en", "prediction": p, "answers": a}
            for i, (p, a) in enumerate([("two", ["2"] * 10), ("cat", ["dog"] * 10)])]
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert main(["eval", "vqa", "--predictions", str(vqa), "--out", str(tmp_path / "r"), "--name", "v1"]) == 0
    rep = load_report(str(tmp_path / "r" / "v1.json"))
    assert rep["per_language"]["en"]["vqa_accuracy"] == pytest.approx(50.0)
    assert rep["metadata"]["data"] == str(vqa)
    caps = tmp_path / "cap.jsonl"
    caps.write_text(json.dumps({"id": 1, "lang": "de", "prediction": "ein Hund läuft im Park",
                                "references": ["ein Hund rennt im Park", "ein Hund im Park"]}) + "\n",
                    encoding="utf-8")
    assert main(["eval", "caption", "--predictions", str(caps), "--out", str(tmp_path / "r"), "--name", "c1"]) == 0
    assert (tmp_path / "r" / "c1.png").is_file()
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "r" / "v1.json"), str(tmp_path / "r" / "v1.json")]) == 0
    assert "| en | 50.00 | 50.00 |" in capsys.readouterr().out
    assert main(["eval", "vqa", "--predictions", str(tmp_path / "nope.jsonl")]) == 2  # one-line user error
    assert "not found" in capsys.readouterr().err
