"""``vlm demo --embedder --quick``: the whole stage on small random parts (end to end, marked slow)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_embedder_quick(tmp_path):
    from vlm.cli import main

    assert main(["demo", "--embedder", "--quick", "--out", str(tmp_path), "--no-progress", "--workers", "0"]) == 0
    rep = json.loads((tmp_path / "report" / "embedder-compare.json").read_text())
    assert rep["models"] == ["dual encoder", "embedder untuned", "embed random", "embed hard-neg"]
    assert set(rep["per_language"]) == {"en", "de"}
    for name in rep["models"]:
        assert rep["per_language"]["de"][f"{name}/top1"] is not None
        assert rep["per_language"]["de"][f"{name}/R@10"] is not None
    assert (tmp_path / "data" / "train" / "clusters.jsonl").is_file()
    for d in ("embed_run", "embed_hard", "embed_random"):
        assert (tmp_path / d / "final" / "config.json").is_file()


def test_demo_embedder_bad_args_one_line(tmp_path, capsys):
    from vlm.cli import main

    assert main(["demo", "--embedder", "--steps", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--steps must be >= 1" in err[0]
