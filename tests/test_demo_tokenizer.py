"""``vlm demo --tokenizer --quick``: every stage runs (two dual encoders, dual and single tokenizers and their
evaluation, t2i and its unconditioned baseline, the per-language generation table) and the report holds
all tables."""
import json

from vlm.cli import main as vlm_main


def test_quick_tokenizer_demo_writes_all_tables(tmp_path, capsys):
    out = tmp_path / "demo"
    assert vlm_main(["demo", "--tokenizer", "--quick", "--out", str(out), "--no-progress"]) == 0
    md = (out / "report" / "tokenizer-demo.md").read_text(encoding="utf-8")
    assert "| dual |" in md and "| single |" in md and "unconditioned baseline" in md
    t2i = json.loads((out / "report" / "t2i-demo.json").read_text(encoding="utf-8"))
    assert len(t2i["per_language"]) == 2
    for r in t2i["per_language"].values():
        assert r["accuracy_chance"] == 10.0 and "accuracy_baseline" in r
    assert (out / "report" / "t2i-demo-grid.png").is_file()
    assert "vlm demo --tokenizer finished" in capsys.readouterr().out
