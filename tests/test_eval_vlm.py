"""Caption / VQA evaluation from a vision-LLM over shards (eval.caption, eval.vqa, `vlm eval caption|vqa
--model`), the VQA training stream (make_loader(task="vqa")), and the demo's vision-LLM stage (vlm.cli.demo_vlm)."""
import io
import json
from pathlib import Path

import pytest
import torch

from vlm.eval.caption import evaluate_captions, generate_captions
from vlm.eval.vqa import evaluate_vqa
from vlm.adapters.lora import LoraAdapter
from vlm.data.decode import SampleSkipped
from vlm.data.vqa import majority_answer, parse_vqa
from vlm.data.wds import DataConfig, make_loader
from vlm.vision_llm import VisionLLM, VisionLLMConfig

LANGS = ["en", "de", "zh"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=40, val=12, size=32, train_shards=1, val_shards=1,
                      langs=LANGS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = VisionLLM(VisionLLMConfig(llm_cfg={"hidden_size": 32, "num_layers": 1}, lora=LoraAdapter(r=2)))
    return m.save_pretrained(tmp_path_factory.mktemp("vllm") / "model")


def vqa_shard(path: Path, n: int = 10) -> str:
    import webdataset as wds
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path / "vqa-000000.tar")) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (20 * i, 100, 200)).save(buf, format="PNG")
            meta = ({"question": {"en": "What is it?", "de": "Was ist das?"}, "answers": {"en": ["a"], "de": ["b"]}}
                    if i % 2 else {"question": "How many?", "answers": ["2", "2", "3"], "lang": "en"})
            w.write({"__key__": f"v{i:03d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})
        w.write({"__key__": "broken", "png": b"not an image", "json": json.dumps({"question": "q",
                                                                                  "answers": ["a"]}).encode()})
    return str(path / "vqa-000000.tar")


def test_parse_vqa_formats():
    assert parse_vqa({"question": "Q?", "answers": ["x", "y"], "lang": "de"}) == {"de": ("Q?", ["x", "y"])}
    both = parse_vqa({"question": {"en": "Q", "ZH": "问"}, "answers": {"en": "yes", "zh": ["是"]}})
    assert both == {"en": ("Q", ["yes"]), "zh": ("问", ["是"])}
    assert parse_vqa({"question": "Q", "answer": "one"}) == {"en": ("Q", ["one"])}
    with pytest.raises(SampleSkipped, match="no_vqa"):
        parse_vqa({"question": "Q", "answers": []})
    assert majority_answer(["b", "a", "a", "b", "c", "a"]) == "a"


def test_caption_eval_per_language_and_blind(demo, model_dir, tmp_path):
    model = VisionLLM.from_pretrained(model_dir)
    out = evaluate_captions(model, demo.val_spec, str(tmp_path), name="cap", langs=["de", "zh"], limit=5,
                            batch_size=3, max_new_tokens=4)
    res = out["results"]
    assert set(res["per_language"]) == {"de", "zh"} and res["per_language"]["de"]["n"] == 5
    assert all(0 <= r["chrf"] <= 100 for r in res["per_language"].values())
    rows = [json.loads(x) for x in Path(out["paths"]["predictions"]).read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and {"id", "lang", "prediction", "references"} <= set(rows[0])
    assert all(Path(p).is_file() for p in out["paths"].values())
    refs = json.loads(Path(out["paths"]["json"]).read_text(encoding="utf-8"))
    assert refs["metadata"]["n_rows"] == 10
    # a constant image: one caption per language, whatever the picture
    blind, _ = generate_captions(model, demo.val_spec, langs=["en"], limit=4, max_new_tokens=4, blank_images=True)
    assert len({r["prediction"] for r in blind}) == 1


def test_vqa_eval_and_cli(demo, model_dir, tmp_path):
    from vlm.cli import main

    shard = vqa_shard(tmp_path / "vqa")
    model = VisionLLM.from_pretrained(model_dir)
    out = evaluate_vqa(model, shard, str(tmp_path / "rep"), max_new_tokens=3, batch_size=4)
    per = out["results"]["per_language"]
    assert per["en"]["n"] == 10 and per["de"]["n"] == 5
    assert json.loads(Path(out["paths"]["json"]).read_text())["metadata"]["skipped"] == {"corrupt_image": 1}
    rc = main(["eval", "vqa", "--model", str(model_dir), "--shards", shard, "--out", str(tmp_path / "cli"),
               "--langs", "de", "--max-new-tokens", "2", "--no-progress"])
    assert rc == 0 and (tmp_path / "cli" / "vqa-predictions.jsonl").is_file()
    rc = main(["eval", "caption", "--model", str(model_dir), "--shards", demo.val_spec, "--out",
               str(tmp_path / "cli"), "--limit", "2", "--max-new-tokens", "2", "--no-progress"])
    rep = json.loads((tmp_path / "cli" / "caption.json").read_text(encoding="utf-8"))
    assert rc == 0 and set(rep["per_language"]) == set(LANGS)


def test_vqa_stream_resume_is_exact(tmp_path, model_dir):
    shard = vqa_shard(tmp_path / "vqa", n=20)
    cfg = DataConfig(shards=shard, batch_size=3, shuffle_buffer=6, shuffle_initial=3, seed=3, num_workers=0)
    pre = VisionLLM.from_pretrained(model_dir).image_preprocess
    full = list(make_loader(cfg, pre, task="vqa"))
    s = make_loader(cfg, pre, task="vqa")
    it = iter(s)
    head = [next(it), next(it)]
    state = json.loads(json.dumps(s.state_dict()))
    rest = list(make_loader(cfg, pre, task="vqa", start_sample=state))
    keys = [b["key"] for b in full]
    assert [b["key"] for b in head + rest] == keys and len(keys) == 6  # 20 usable, drop_last
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(full[2:], rest))
    assert [b["lang"] for b in full] == [b["lang"] for b in head + rest]
    assert all(t == majority_answer(a) for b in full for t, a in zip(b["target"], b["answers"]))
    assert {"question", "answers", "target", "lang", "key"} <= set(full[0]) and "prompt" not in full[0]
    s2 = make_loader(cfg, pre, task="vqa", start_sample=state)
    list(s2)
    # counted once, before or after the checkpoint; the last 2 usable samples are a dropped partial batch
    assert s2.skipped == {"corrupt_image": 1, "partial_batch_dropped": 2}
    with pytest.raises(Exception, match="shard"):
        make_loader(cfg, pre, task="vqa", rank=0, world_size=2)


def test_demo_vlm_quick(demo, tmp_path):
    from vlm.cli.demo_vlm import run_vlm_demo

    out = run_vlm_demo(demo, tmp_path / "out", quick=True, steps=2, workers=0, no_progress=True)
    assert set(out["per_language"]) == set(LANGS)
    assert all(Path(p).is_file() for p in out["report"].values())
    rep = json.loads(Path(out["report"]["json"]).read_text(encoding="utf-8"))
    assert rep["metrics"][:2] == ["chrf", "chrf_blind"] and rep["summary"]["n_languages"] == 3
    assert Path(out["model_dir"], "adapter", "llm", "lora", "adapter_config.json").is_file()
    import yaml

    blind_cfg = yaml.safe_load(Path(out["blind_model_dir"]).parent.joinpath("config.yaml").read_text())
    assert blind_cfg["image_blind"] is True and blind_cfg["train"]["steps"] == 2
    assert "shape_acc" in rep["metrics"] and 0 <= rep["summary"]["mean_shape_acc"] <= 100
    # both models run on the demo LLM, a transformers directory loaded through hf:
    assert blind_cfg["model"]["llm"] == f"hf:{out['llm_dir']}"
    assert Path(out["llm_dir"], "config.json").is_file() and Path(out["llm_dir"], "tokenizer.json").is_file()


def test_demo_llm_is_a_reusable_transformers_dir_with_a_corpus_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlm.data_recipes.demo import all_captions
    from vlm.cli.demo_vlm import build_demo_llm

    d = build_demo_llm(tmp_path / "llm", ["en", "de"])
    tok = AutoTokenizer.from_pretrained(d)  # plain transformers reads it
    assert AutoModelForCausalLM.from_pretrained(d).config.model_type == "llama"
    cap = all_captions(["de"])[0]
    assert len(tok(cap, add_special_tokens=False)["input_ids"]) <= len(cap.split()) + 2  # ~ a token per word
    stamp = (d / "vlm-demo-llm.json").stat().st_mtime_ns
    assert build_demo_llm(tmp_path / "llm", ["en", "de"]) == d and (d / "vlm-demo-llm.json").stat().st_mtime_ns == stamp
    build_demo_llm(tmp_path / "llm", ["en", "fr"])  # other languages: another corpus, rebuilt in place
    assert (d / "vlm-demo-llm.json").stat().st_mtime_ns != stamp and not (tmp_path / "llm.tmp").exists()


def test_shape_accuracy_counts_captions_naming_the_drawn_shape_only():
    from vlm.cli.demo_vlm import shape_accuracy

    refs = ["a photo of the circle.", "the red circle."]
    rows = [{"lang": "en", "prediction": "a drawing of the circle.", "references": refs},
            {"lang": "en", "prediction": "a circle and a square.", "references": refs},  # two shapes: wrong
            {"lang": "en", "prediction": "a drawing of the square.", "references": refs},
            {"lang": "en", "prediction": "the red thing.", "references": refs},
            {"lang": "de", "prediction": "Zeichnung: ein Kreis in Rot.", "references": ["Kreis", "ein Kreis in Blau."]}]
    assert shape_accuracy(rows) == {"en": 25.0, "de": 100.0}
