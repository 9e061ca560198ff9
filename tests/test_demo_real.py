"""vlm demo --real: without its downloaded assets it is a one-line error naming the set-up command (exit 2);
the report tables are built from the stages' results."""
import pytest

from vlm.cli import main as vlm_main
from vlm.cli.demo_real import SETUP, MissingAssets, find_assets, lit_tables, vlm_table


def test_missing_assets_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_REAL_ASSETS", str(tmp_path / "nothing"))
    assert vlm_main(["demo", "--real", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and SETUP in err[0] and "VLM_REAL_ASSETS" in err[0]
    assert not (tmp_path / "o" / "real").exists()  # nothing ran
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "effnet_lite0.safetensors").write_bytes(b"x")
    with pytest.raises(MissingAssets, match="e5 text tower"):
        find_assets(tmp_path / "half")


def test_bad_steps_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLM_REAL_ASSETS", str(tmp_path))
    assert vlm_main(["demo", "--real", "--steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def _ret(r1, r10):
    d = {}
    for k, v in ((1, r1), (5, (r1 + r10) / 2), (10, r10)):
        d.update({f"i2t_r{k}": v, f"t2i_r{k}": v, f"i2t_r{k}_chance": k, f"t2i_r{k}_chance": k})
    return {**d, "n_images": 30}


def test_tables():
    zs = {"de": {"top1": 50.0, "top1_chance": 12.5, "n_images": 20}, "xx": {"top1": None}}
    run = lambda a: {"en": {"retrieval": {"de": _ret(a, 3 * a)}, "zeroshot": zs},  # noqa: E731
                     "multi": {"retrieval": {"de": _ret(a + 5, 3 * a + 5)}, "zeroshot": zs}, "eval_langs": ["de"]}
    t = lit_tables({"real": run(10.0), "random": run(1.0)})
    de = t["real-lit-multilingual"]["per_language"]["de"]
    assert de["r1_gain"] == 5.0 and de["r1_english"] == 10.0 and de["r1_random"] == 6.0
    eng = t["real-lit-english"]["per_language"]["de"]
    assert eng["r10"] == 30.0 and eng["r1_chance"] == 1 and eng["r10_random"] == 3.0
    assert list(t["real-zeroshot"]["per_language"]) == ["de"]  # a language without images is not a row
    v = vlm_table({"image": {"per_language": {"en": {"n": 4, "chrf": 30.0, "cider": 20.0, "bleu4": 5.0}}},
                   "blind": {"per_language": {"en": {"n": 4, "chrf": 20.0, "cider": 5.0, "bleu4": 1.0}}},
                   "images": 4})
    assert v["per_language"]["en"]["chrf_chance"] == 20.0 and v["summary"]["mean_cider"] == 20.0
