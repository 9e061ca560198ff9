"""An embedder in the evaluation: loaded by directory, vlm eval zeroshot on it, vlm eval compare beside a dual
encoder; bad arguments are one line (exit 2)."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo
    from vlm.embedder import Embedder, EmbedderConfig
    from vlm.model import DualEncoder, DualEncoderConfig
    from vlm.vision_llm import VisionLLMConfig

    tmp = tmp_path_factory.mktemp("embeval")
    demo = build_demo(tmp / "d", train=8, val=12, size=32, train_shards=1, val_shards=1, langs=["en", "de"])
    torch.manual_seed(0)
    Embedder.from_config(EmbedderConfig(base=VisionLLMConfig())).save_pretrained(tmp / "emb")
    DualEncoder.from_config(DualEncoderConfig()).save_pretrained(tmp / "dual")
    return demo, tmp


def test_vlm_eval_zeroshot_and_retrieval_run_on_an_embedder(setup):
    from vlm.cli import main

    demo, tmp = setup
    common = ["--model", str(tmp / "emb"), "--out", str(tmp / "ev"), "--workers", "0", "--no-progress"]
    assert main(["eval", "zeroshot", *common, "--images", demo.val_spec]) == 0
    rep = json.loads((tmp / "ev" / "zeroshot-translated.json").read_text())
    assert set(rep["per_language"]) == {"en", "de"} and rep["metadata"]["n_images"] == 12
    assert main(["eval", "retrieval", *common, "--shards", demo.val_spec]) == 0


def test_vlm_eval_compare_models(setup):
    from vlm.cli import main

    demo, tmp = setup
    out = tmp / "cmp"
    assert main(["eval", "compare", "--models", str(tmp / "dual"), str(tmp / "emb"), "--names", "dual,emb",
                 "--images", demo.val_spec, "--shards", demo.val_spec, "--out", str(out)]) == 0
    rep = json.loads((out / "compare.json").read_text())
    assert rep["models"] == ["dual", "emb"]
    for lang in ("en", "de"):
        row = rep["per_language"][lang]
        for k in ("dual/top1", "emb/top1", "dual/R@1", "emb/R@10", "chance/top1", "chance/R@5"):
            assert row[k] is not None
        own = json.loads((out / "emb" / "retrieval.json").read_text())["per_language"][lang]
        assert row["emb/R@5"] == pytest.approx((own["i2t_r5"] + own["t2i_r5"]) / 2)
    assert (out / "compare.png").stat().st_size > 1000 and "| de |" in (out / "compare.md").read_text()


@pytest.mark.parametrize("extra, msg", [
    (["--models", "/nonexistent"], "is not a model directory"),
    (["--names", "a"], "--names must give 2 distinct names"),
    ([], "needs report JSONs"),
])
def test_compare_bad_args_one_line(setup, extra, msg, capsys):
    from vlm.cli import main

    demo, tmp = setup
    argv = ["eval", "compare", "--images", demo.val_spec]
    if extra and extra[0] == "--names":
        argv += ["--models", str(tmp / "dual"), str(tmp / "emb")]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]


def test_eval_prompts_each_language_in_its_own_language(setup):
    """An embedder with ``lang_prompts``: ``vlm eval``'s text encoder prompts a language's texts in that
    language (as ``encode_text(..., lang=)`` does), and zero-shot and retrieval pass the scored language."""
    from vlm.embedder import Embedder, EmbedderConfig
    from vlm.eval.babel import load_labels, load_prompts
    from vlm.eval.retrieval import evaluate_retrieval
    from vlm.eval.zeroshot import evaluate_zeroshot, make_text_encoder
    from vlm.vision_llm import VisionLLMConfig

    demo, _ = setup
    torch.manual_seed(0)
    m = Embedder.from_config(EmbedderConfig(base=VisionLLMConfig(), lang_prompts=True,
                                            prompts={"de": {"text_instruction": "In einem Wort:"}})).eval()
    enc = make_text_encoder(m)
    texts = ["ein Kreis", "ein Quadrat"]
    with torch.no_grad():
        assert torch.allclose(enc(texts, lang="de"), m.encode_text(texts, lang="de"), atol=1e-5)
        assert not torch.allclose(enc(texts, lang="de"), enc(texts), atol=1e-3)
    seen = []

    def spy(texts, lang=None):
        seen.append(lang)
        return enc(texts, lang=lang)
    spy.takes_lang = True
    labels, prompts = load_labels(str(demo.labels)), load_prompts(str(demo.prompts))
    classes = torch.tensor(labels.classes["en"][:4])
    evaluate_zeroshot(torch.randn(4, m.embed_dim), classes, labels, prompts, encode_texts=spy, langs=["en", "de"])
    assert set(seen) == {"en", "de"}
    seen.clear()
    evaluate_retrieval(torch.randn(2, m.embed_dim), [{"en": ["a circle"], "de": ["ein Kreis"]}] * 2, spy)
    assert set(seen) == {"en", "de"}
    m2 = Embedder.from_config(EmbedderConfig(base=VisionLLMConfig(), lang_prompts=False))
    assert not make_text_encoder(m2).takes_lang
