"""Malformed command lines and configs through ``vlm.cli.main`` (in-process): each must end with exit code 2
and exactly one ``vlm <cmd>: error: ...`` line on stderr naming the thing, never a traceback.

Cases are data (:data:`CASES`: id, argv template, command, key phrase); ``{demo}``, ``{tmp}``, ``{model}``,
``{train}``/``{val}`` (the demo shards) and the bad files of :func:`ctx` are filled in. Training cases get
tiny, fast data overrides (:data:`FAST`) so that a case which is *not* refused would still end quickly.
Fail-fast cases (``--langs zz``) monkeypatch the expensive step to raise if it is reached.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from vlm.cli import main

FAST = ["data.shards={train}", "val_data.shards={val}", "train.steps=1", "data.num_workers=0", "data.batch_size=4",
        "train.run_dir={tmp}/run", "val_batches=1"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict:
    """Demo shards, a tiny saved dual encoder, and malformed files, made once for the module."""
    from vlm.data_recipes.demo import build_demo
    from vlm.model import DualEncoder

    tmp = tmp_path_factory.mktemp("bad_input")
    demo = build_demo(tmp / "demo", train=16, val=8, size=32, train_shards=1, val_shards=1, langs=["en", "de"])
    model = DualEncoder.from_config({"image_tower": "tiny:vit", "image_tower_cfg": dict(width=32, depth=1, heads=2,
                                     image_size=32, patch_size=8), "text_tower": "ngram:text",
                                     "text_tower_cfg": {"width": 32, "buckets": 4096}, "embed_dim": 16})
    model_dir = model.save_pretrained(tmp / "model")
    (tmp / "bad.yaml").write_text("task: pretrain\nmodel: [unclosed\n", encoding="utf-8")
    (tmp / "bad.json").write_text('{"task": "pretrain",', encoding="utf-8")
    (tmp / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    (tmp / "notask.yaml").write_text("model: {}\n", encoding="utf-8")
    (tmp / "adir").mkdir()
    (tmp / "preds.jsonl").write_text(json.dumps({"id": "1", "lang": "en", "prediction": "a", "answers": ["a"]})
                                     + "\n", encoding="utf-8")
    (tmp / "hf_llm").mkdir()  # a directory the llm switch points at (never read: the options are refused first)
    return {"tmp": str(tmp), "demo": str(tmp / "demo"), "train": demo.train_spec, "val": demo.val_spec,
            "model": str(model_dir)}


def _train(*extra, cfg="pretrain_demo"):
    return ["train", cfg, *FAST, *extra]


# (id, argv, command as printed, phrase that must be in the error line)
CASES = [
    # ------------------------------------------------------------------ vlm train: the config itself
    ("train-no-args", ["train"], "train", "give a config file or a shipped config name"),
    ("train-missing-config", ["train", "{tmp}/nope.yaml"], "train", "does not exist"),
    ("train-config-is-dir", ["train", "{tmp}/adir"], "train", "is a directory"),
    ("train-malformed-yaml", ["train", "{tmp}/bad.yaml"], "train", "not valid YAML.*line"),
    ("train-malformed-json", ["train", "{tmp}/bad.json"], "train", "not valid JSON.*line"),
    ("train-yaml-not-mapping", ["train", "{tmp}/list.yaml"], "train", "mapping at the top level"),
    ("train-no-task", ["train", "{tmp}/notask.yaml"], "train", "no 'task' key"),
    ("train-unknown-task", _train("task=bogus"), "train", "unknown task 'bogus'.*pretrain"),
    ("train-unknown-key", _train("optim.lrr=1"), "train", "unknown config key optim.lrr.*Valid keys under optim"),
    ("train-unknown-section", _train("bogus.x=1"), "train", "unknown config key bogus"),
    ("train-override-no-equals", _train("optim.lr"), "train", "must look like dotted.key=value"),
    ("train-steps-abc", _train("train.steps=abc"), "train", "train.steps: expected an integer, got 'abc'"),
    ("train-lr-text", _train("optim.lr=fast"), "train", "optim.lr: expected a number"),
    ("train-bool-maybe", _train("train.progress=maybe"), "train", "train.progress: expected true/false"),
    ("train-lr-negative", _train("optim.lr=-1"), "train", r"optim.lr must be > 0, got -1"),
    ("train-batch-size-0", _train("data.batch_size=0"), "train", "data.batch_size must be >= 1, got 0"),
    ("train-workers-negative", _train("data.num_workers=-1"), "train", "data.num_workers must be >= 0"),
    ("train-shards-no-match", _train("data.shards={tmp}/none-*.tar"), "train", "data.shards: no shard matches"),
    ("train-val-shard-missing", _train("val_data.shards={tmp}/x.tar"), "train", "val_data.shards: .*do not exist"),
    ("finetune-task-weight-negative", _train("tasks={{caption: -1}}", cfg="finetune_demo"), "train",
     "weights must be >= 0"),
    # ------------------------------------------------------------------ vlm train: the parts and their options
    ("tower-bogus-kw-timm", _train("model.image_tower_cfg={{bogus_kw: 1}}"), "train",
     "model.image_tower_cfg: tower spec 'timm:resnet10t' has no option 'bogus_kw'; its options are .*drop_rate"),
    ("tower-img-size-on-convnet", _train("model.image_tower_cfg={{img_size: 128}}"), "train",
     "has no option 'img_size'.*pretrained_cfg_overlay=\\{input_size"),
    ("tower-bogus-kw-ngram", _train("model.text_tower_cfg={{bogus_kw: 1}}"), "train",
     "model.text_tower_cfg: tower spec 'ngram:text' has no option 'bogus_kw'; its options are .*buckets"),
    ("tower-ngram-bad-n", _train("model.text_tower_cfg={{min_n: 5}}"), "train", "min_n <= max_n"),
    ("tower-bogus-kw-tiny", _train("model.tower_cfg={{bogus_kw: 1}}", cfg="finetune_demo"), "train",
     "model.tower_cfg: tower spec 'tiny:vit' has no option 'bogus_kw'; its options are .*patch_size"),
    ("tower-bogus-kw-open-clip", _train("model.image_tower=open_clip:RN50", "model.image_tower_cfg={{bogus_kw: 1}}"),
     "train", "tower spec 'open_clip:RN50' has no option 'bogus_kw'; its options are .*vision_cfg"),
    ("tower-overlay-bad-key", _train("model.image_tower_cfg={{pretrained_cfg_overlay: {{crop: 1}}}}"), "train",
     "pretrained_cfg_overlay has no key 'crop' \\(did you mean 'crop_pct'"),
    ("tower-overlay-nonsquare", _train("model.image_tower_cfg={{pretrained_cfg_overlay: {{input_size: [3, 64, 32]}}}}"),
     "train", "input_size must be \\[3, S, S\\]"),
    ("tower-timm-unknown-name", _train("model.image_tower=timm:resnet1"), "train",
     "unknown timm model 'resnet1'; did you mean .*resnet18"),
    ("tower-timm-missing-weights", _train("model.image_tower_cfg={{pretrained: {tmp}/no.safetensors}}"), "train",
     "pretrained weights file .* does not exist"),
    ("tower-open-clip-unknown-arch", _train("model.image_tower=open_clip:NoSuchArch"), "train",
     "unknown open_clip architecture 'NoSuchArch'"),
    ("tower-unknown-family", _train("model.image_tower=nosuch:x"), "train", "unknown tower spec 'nosuch:x'"),
    ("llm-switch-keeps-old-cfg", _train("model.llm=hf:{tmp}/hf_llm", cfg="finetune_demo"), "train",
     "model.llm_cfg: llm spec 'hf:.*' has no options 'hidden_size'.*reset it with 'model.llm_cfg=\\{\\}'"),
    ("llm-bogus-kw", _train("model.llm_cfg={{bogus: 1}}", cfg="finetune_demo"), "train",
     "llm spec 'tiny:llama' has no option 'bogus'; its options are .*hidden_size"),
    ("llm-unknown-tiny-family", _train("model.llm=tiny:gpt9", "model.llm_cfg={{}}", cfg="finetune_demo"), "train",
     "unknown tiny LLM family 'gpt9'"),
    ("projector-bogus-kw", _train("model.projector_cfg={{bogus: 1}}", cfg="finetune_demo"), "train",
     "model.projector_cfg: projector spec 'mlp2x_gelu' has no option 'bogus'; its options are .*ln_vision"),
    ("projector-moe-bogus-kw", _train("model.projector=moe:e2-top1", "model.projector_cfg={{expert: 2}}",
                                      cfg="finetune_demo"), "train", "did you mean 'num_experts'"),
    ("projector-bad-activation", _train("model.projector=mlp:2x_foo", cfg="finetune_demo"), "train",
     "unknown MLP projector activation 'foo'"),
    ("projector-moe-bad-token", _train("model.projector=moe:x6", "model.projector_cfg={{}}", cfg="finetune_demo"), "train",
     "bad MoE spec token 'x6'"),
    ("projector-unknown", _train("model.projector=bogus", cfg="finetune_demo"), "train",
     "unknown projector spec 'bogus'"),
    ("lora-bogus-key", _train("model.lora={{bogus: 1}}", cfg="finetune_demo"), "train",
     "unknown config key model.lora.bogus"),
    # ------------------------------------------------------------------ vlm eval
    ("eval-no-task", ["eval"], "eval", "choose a task"),
    ("eval-zeroshot-bad-mode", ["eval", "zeroshot", "--model", "{model}", "--images", "{val}", "--mode", "bogus"],
     "eval zeroshot", "argument --mode: invalid choice: 'bogus'"),
    ("eval-zeroshot-langs-zz", ["eval", "zeroshot", "--model", "{model}", "--images", "{val}", "--langs", "zz",
                                "--out", "{tmp}/ev"], "eval", "language 'zz' is not in the labels file"),
    ("eval-retrieval-langs-zz", ["eval", "retrieval", "--model", "{model}", "--shards", "{val}", "--langs", "zz",
                                 "--out", "{tmp}/ev"], "eval", "--langs: unknown language code 'zz'"),
    ("eval-caption-langs-zz", ["eval", "caption", "--model", "{model}", "--shards", "{val}", "--langs", "zz"],
     "eval", "--langs: unknown language code 'zz'"),
    ("eval-vqa-langs-zz", ["eval", "vqa", "--predictions", "{tmp}/preds.jsonl", "--langs", "en,zz"], "eval",
     "--langs: unknown language code 'zz'"),
    ("eval-caption-negative-limit", ["eval", "caption", "--model", "{model}", "--shards", "{val}", "--limit", "-1"],
     "eval", "--limit must be >= 1, got -1"),
    ("eval-batch-size-0", ["eval", "retrieval", "--model", "{model}", "--shards", "{val}", "--batch-size", "0"],
     "eval", "--batch-size must be >= 1"),
    ("eval-workers-negative", ["eval", "retrieval", "--model", "{model}", "--shards", "{val}", "--workers", "-2"],
     "eval", "--workers must be >= 0"),
    ("eval-bad-device", ["eval", "retrieval", "--model", "{model}", "--shards", "{val}", "--device", "bogus"],
     "eval", "--device 'bogus' is not a torch device"),
    ("eval-missing-model", ["eval", "retrieval", "--model", "{tmp}/nomodel", "--shards", "{val}"], "eval",
     "model not found"),
    ("eval-shards-no-match", ["eval", "retrieval", "--model", "{model}", "--shards", "{tmp}/none-*.tar"], "eval",
     "--shards: no shard matches"),
    ("eval-missing-predictions", ["eval", "caption", "--predictions", "{tmp}/nope.jsonl"], "eval",
     "--predictions .*not found"),
    ("eval-compare-missing-report", ["eval", "compare", "{tmp}/nope.json"], "eval", "report not found"),
    # ------------------------------------------------------------------ other commands
    ("caption-missing-image", ["caption", "{tmp}/nope.png", "--model", "{model}"], "caption",
     "image file .*nope.png does not exist"),
    ("demo-steps-0", ["demo", "--out", "{tmp}/demo_out", "--steps", "0"], "demo", "--steps must be >= 1"),
    ("demo-bad-override", ["demo", "--out", "{tmp}/demo_out", "optim.bogus=1"], "demo",
     "unknown config key optim.bogus"),
    ("shards-demo-negative", ["shards", "demo", "--out", "{tmp}/sh", "--train", "-1"], "shards", "train=-1"),
    ("parts-unknown-kind", ["parts", "widget"], "parts", "invalid choice: 'widget'"),
]
if torch.cuda.is_available():
    CASES = [c for c in CASES if c[0] != "eval-bad-device"]
else:
    CASES.append(("eval-cuda-absent", ["eval", "retrieval", "--model", "{model}", "--shards", "{val}", "--device",
                                        "cuda"], "eval", "no CUDA device here"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``vlm.cli.main(argv)`` -> (exit code, stderr); argparse's own errors exit through SystemExit."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_error_line(rc, err: str, cmd: str, phrase: str) -> str:
    assert "Traceback" not in err, err
    assert rc == 2, f"exit code {rc}; stderr:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("vlm ") and ": error:" in ln]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"vlm {cmd}: error:"), line
    assert re.search(phrase, line), f"{phrase!r} not in: {line}"
    return line


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail loudly if a refused command reaches image embedding, model loading or generation."""
    import vlm.eval.cli as ecli
    import vlm.eval.zeroshot as zs

    def boom(*a, **k):
        raise AssertionError("reached the expensive step before the arguments were checked")

    monkeypatch.setattr(zs, "embed_images", boom)
    monkeypatch.setattr(ecli, "load_model", boom)
    monkeypatch.setattr("vlm.vision_llm.VisionLLM.from_pretrained", boom)


@pytest.mark.parametrize("argv,cmd,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(argv, cmd, phrase, ctx, capsys, no_heavy_work):
    rc, err = run_cli([a.format(**ctx) for a in argv], capsys)
    assert_one_error_line(rc, err, cmd, phrase)


def test_case_count():
    assert len(CASES) >= 40


def test_resume_with_a_different_model_is_refused(ctx, capsys, tmp_path):
    """A finished run resumed with a changed model is refused before its weights are read."""
    fast = [a.format(**{**ctx, "tmp": str(tmp_path)}) for a in FAST]
    small = ["model.image_tower=tiny:vit", "model.image_tower_cfg={width: 32, depth: 1, heads: 2, image_size: 32, "
             "patch_size: 8}", "model.text_tower_cfg={width: 32, buckets: 4096}", "model.embed_dim=16"]
    rc, err = run_cli(["train", "pretrain_demo", *fast, *small], capsys)
    assert rc == 0, err
    rc, err = run_cli(["train", "pretrain_demo", *fast, *small, "model.embed_dim=24", "train.resume=latest"], capsys)
    assert_one_error_line(rc, err, "train", "resuming .* with model")
