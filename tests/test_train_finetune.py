"""Fine-tuning recipe: loss falls on the demo captions, token-normalised accumulation equals one big batch,
kill-and-resume equals an uninterrupted run, caption + VQA task mix, config errors, CLI dispatch."""
import io
import json
from pathlib import Path

import pytest
import torch

from vlm.train import finetune
from vlm.distributed import DistEnv
from vlm.config import load_config
from vlm.errors import UserError
from vlm.vision_llm import VisionLLM

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "finetune_demo.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=96, val=16, size=32, train_shards=2, val_shards=1,
                      langs=["en", "de", "zh", "ru"])


def write_vqa_shards(path: Path, n: int = 24) -> str:
    """A VQA shard: coloured squares, json {question {lang: q}, answers {lang: [..]}, lang}."""
    import webdataset as wds
    from PIL import Image

    colours = {"red": ((220, 30, 30), "rot"), "blue": ((30, 30, 220), "blau"), "green": ((30, 200, 30), "grün")}
    names = list(colours)
    path.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path / "vqa-000000.tar")) as w:
        for i in range(n):
            c = names[i % 3]
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colours[c][0]).save(buf, format="JPEG")
            meta = {"question": {"en": "What colour is the image?", "de": "Welche Farbe hat das Bild?"},
                    "answers": {"en": [c, c], "de": [colours[c][1]]}, "lang": "en"}
            w.write({"__key__": f"q{i:04d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()})
    return str(path / "vqa-000000.tar")


def make_cfg(demo, run_dir, **extra):
    ov = {"data.shards": demo.train_spec, "data.batch_size": 8, "data.num_workers": 0, "data.shuffle_buffer": 16,
          "data.shuffle_initial": 4, "val_data.shards": demo.val_spec, "val_data.batch_size": 8,
          "model.tower_cfg": "{}", "model.llm_cfg": "{hidden_size: 32, num_layers: 1, num_heads: 4}",
          "model.lora.r": 4, "model.max_target_length": 48, "train.steps": 8, "train.threads": 1,
          "train.log_every": 1, "train.ckpt_every": 0, "train.run_dir": str(run_dir), "train.resume": "null",
          "train.dist": "none", "train.device": "cpu", "train.progress": "false", "train.tensorboard": "false",
          "optim.warmup_steps": 1, "optim.lr": 3e-3, "optim.part_lr": "{projector: 3.0e-3, llm: 3.0e-3}",
          "val_batches": 1, "mix.languages": "[en, de, zh, ru]"}
    ov.update(extra)
    return load_config(finetune.FinetuneConfig, CONFIG, [f"{k}={v}" for k, v in ov.items()])


def _losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_finetune_loss_falls_and_exports(demo, tmp_path):
    out = finetune.run(make_cfg(demo, tmp_path / "run", **{"train.steps": 10}))
    recs = [r for r in _losses(tmp_path / "run") if "lm_loss" in r]
    assert len(recs) == 10 and all(r["tasks"] == {"caption": 1} for r in recs)
    first, last = recs[0]["lm_loss"], sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert out["val_loss"] is not None and out["val_loss"] < first
    final = Path(out["final_dir"])
    assert (final / "adapter" / "llm" / "lora" / "adapter_config.json").is_file()  # LoRA in peft's format
    m = VisionLLM.from_pretrained(final)
    caps = m.generate(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), lang=["de", "zh"], max_new_tokens=4)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_accumulation_is_token_normalised(demo):
    """Two micro-batches of different target lengths give the gradient of the one batch holding both."""
    cfg = make_cfg(demo, "unused")
    torch.manual_seed(0)
    model = VisionLLM(cfg.model)
    model.train()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    targets = ["a red circle", "ein sehr langer deutscher Satz über ein Bild", "ok", "zwei"]
    langs = ["en", "de", "en", "de"]
    env = DistEnv()

    def grads(micro):
        model.zero_grad(set_to_none=True)
        out = finetune.lm_step(model, model, [model.prepare_batch(b) for b in micro], env=env, precision="fp32")
        return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    big, g_big = grads([{"pixels": pixels, "target": targets, "lang": langs}])
    acc, g_acc = grads([{"pixels": pixels[:2], "target": targets[:2], "lang": langs[:2]},
                        {"pixels": pixels[2:], "target": targets[2:], "lang": langs[2:]}])
    assert big["tokens"] == acc["tokens"]
    assert abs(big["lm_loss"] - acc["lm_loss"]) < 1e-5
    for a, b in zip(g_big, g_acc):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_kill_and_resume_equals_uninterrupted(demo, tmp_path):
    full = finetune.run(make_cfg(demo, tmp_path / "full", **{"train.steps": 4}))
    part = finetune.run(make_cfg(demo, tmp_path / "part", **{"train.steps": 4, "train.stop_after": 2}))
    assert part["final_dir"] is None
    resumed = finetune.run(make_cfg(demo, tmp_path / "part", **{"train.steps": 4, "train.resume": "latest"}))
    a = [r["lm_loss"] for r in _losses(tmp_path / "full") if "lm_loss" in r]
    b = [r["lm_loss"] for r in _losses(tmp_path / "part") if "lm_loss" in r]
    assert a == b  # the same batches, dropout draws and updates
    from safetensors.torch import load_file

    for name in ("projector.safetensors", "adapter/llm/lora/adapter_model.safetensors"):
        x = load_file(str(Path(full["final_dir"]) / name))
        y = load_file(str(Path(resumed["final_dir"]) / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_caption_vqa_task_mix(demo, tmp_path):
    from vlm.model import DualEncoder, DualEncoderConfig

    torch.manual_seed(5)
    de_dir = DualEncoder.from_config(DualEncoderConfig()).save_pretrained(tmp_path / "dual")  # tiny:vit + tiny:text
    vqa = write_vqa_shards(tmp_path / "vqa")
    cfg = make_cfg(demo, tmp_path / "run", **{"model.tower": f"vlm:{de_dir}",
        "train.steps": 4, "optim.accum_steps": 2, "tasks": "{caption: 1.0, vqa: 1.0}",
        "vqa_data": f"{{shards: {vqa}, batch_size: 4, shuffle_buffer: 8}}", "val_data": "null",
        "model.prompts": "{vqa: {de: ['Frage: {question} Antwort:'], '*': ['Q: {question} A ({lang_name}):']}}"})
    out = finetune.run(cfg)
    tasks = {}
    for r in _losses(tmp_path / "run"):
        for t, n in (r.get("tasks") or {}).items():
            tasks[t] = tasks.get(t, 0) + n
    assert tasks.get("caption", 0) > 0 and tasks.get("vqa", 0) > 0 and sum(tasks.values()) == 8
    assert out["final_dir"] and out["loss"] == out["loss"]
    m = VisionLLM.from_pretrained(out["final_dir"])
    de = DualEncoder.from_pretrained(de_dir)
    assert all(torch.equal(a, b) for a, b in zip(m.tower.state_dict().values(), de.image_tower.state_dict().values()))
    # the saved model carries its prompts: generation and the training collate decide them in one place
    assert m.make_prompt("vqa", "de", "Was?") == "Frage: Was? Antwort:"
    assert m.make_prompt("vqa", "fr", "Quoi ?") == "Q: Quoi ? A (French):"
    sample = {"pixels": torch.zeros(3, 32, 32, dtype=torch.uint8), "lang": "fr", "key": "k", "target": "rouge",
              "question": "Quoi ?"}
    assert m.collate("vqa")([sample])["prompt"] == ["Q: Quoi ? A (French):"]


def test_config_errors_and_mix(demo, tmp_path):
    with pytest.raises(UserError, match="vqa_data"):
        finetune.run(make_cfg(demo, tmp_path, tasks="{caption: 1, vqa: 1}"))
    with pytest.raises(UserError, match="unknown task"):
        finetune.check_config(make_cfg(demo, tmp_path, tasks="{captioning: 1}"))
    with pytest.raises(UserError, match="question"):
        finetune.check_config(make_cfg(demo, tmp_path, **{"model.prompts": "{vqa: {en: ['Answer:']}}"}))
    with pytest.raises(UserError, match="val_data.captions_per_image"):  # checked before training starts
        finetune.check_config(make_cfg(demo, tmp_path, **{"val_data.captions_per_image": 2}))
    with pytest.raises(UserError, match="optim.part_lr prefix 'projektor'"):  # a typo is not silently ignored
        finetune.run(make_cfg(demo, tmp_path / "typo", **{"optim.part_lr": "{projektor: 1.0e-3}"}))
    cfg = make_cfg(demo, tmp_path, **{"mix.en_share": 0.5})
    finetune.apply_mix(cfg)
    assert cfg.data.lang_weights["en"] == pytest.approx(0.5)
    assert cfg.data.lang_weights["zh"] == pytest.approx(0.5 / 3)
    picks = [finetune.pick_task({"caption": 0.5, "vqa": 0.5}, 0, s, 0) for s in range(200)]
    assert picks == [finetune.pick_task({"caption": 0.5, "vqa": 0.5}, 0, s, 0) for s in range(200)]
    assert 60 < picks.count("vqa") < 140


def test_vlm_train_dispatches_finetune(demo, tmp_path):
    from vlm.train.cli import load_recipe, resolve_task

    assert resolve_task(str(CONFIG), []) == "finetune"
    assert load_recipe("finetune").Config is finetune.FinetuneConfig


def test_example_config_with_local_hf_dirs(demo, tmp_path):
    """finetune_example.yaml with real-format local parts: a SigLIP directory, a Q-Former, an mT5 directory
    (LoRA on mBLIP's mT0 targets), caption + VQA mix, temperature language mix from the shard manifest."""
    from transformers import SiglipConfig, SiglipModel

    from vlm.llms.tiny import build_tiny_llm

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    SiglipModel(SiglipConfig(text_config=dict(vocab_size=64, max_position_embeddings=16, **small),
                             vision_config=dict(image_size=32, patch_size=8, **small))).save_pretrained(tmp_path / "sig")
    build_tiny_llm("mt5", langs=["en", "de", "zh", "ru"]).save_pretrained(tmp_path / "mt5")
    vqa = write_vqa_shards(tmp_path / "vqa", n=12)
    ov = {"model.tower": f"hf:{tmp_path / 'sig'}", "model.projector": "qformer:q4-l1-h32-a2-i64",
          "model.llm": f"hf:{tmp_path / 'mt5'}", "model.llm_cfg": "{}", "data.shards": demo.train_spec,
          "data.num_workers": 0, "data.batch_size": 4, "data.shuffle_buffer": 8, "data.epoch_samples": 64,
          "vqa_data.shards": vqa, "vqa_data.batch_size": 4, "vqa_data.shuffle_buffer": 4,
          "val_data.shards": demo.val_spec, "val_data.num_workers": 0, "val_data.batch_size": 4, "val_batches": 1,
          "optim.accum_steps": 2, "optim.warmup_steps": 1, "train.epochs": 0, "train.steps": 2,
          "train.precision": "fp32", "train.threads": 1, "train.run_dir": str(tmp_path / "run"),
          "train.resume": "null", "train.progress": "false", "train.tensorboard": "false", "eval_every": 0}
    cfg = load_config(finetune.FinetuneConfig, ROOT / "train" / "configs" / "finetune_example.yaml",
                      [f"{k}={v}" for k, v in ov.items()])
    out = finetune.run(cfg)
    assert out["step"] == 2 and out["val_loss"] == out["val_loss"]
    assert set(cfg.data.lang_weights) == {"en", "de", "zh", "ru"} and cfg.data.lang_weights["en"] == pytest.approx(0.5)
    adapter = json.loads((Path(out["final_dir"]) / "adapter" / "llm" / "lora" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(["q", "k", "v", "o", "wi_0", "wi_1", "wo"])
    m = VisionLLM.from_pretrained(out["final_dir"])
    assert m.llm.is_encoder_decoder
    assert len(m.generate(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), lang="de", max_new_tokens=3)) == 1


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from vlm.distributed import DistEnv, wrap_model
    from vlm.adapters.lora import LoraAdapter
    from vlm.vision_llm import VisionLLMConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = VisionLLMConfig(llm_cfg={"hidden_size": 32, "num_layers": 1}, lora=LoraAdapter(r=2, dropout=0.0))
        torch.manual_seed(0)
        model = VisionLLM(cfg).train()
        g = torch.Generator().manual_seed(1)
        pixels = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
        targets = ["a red circle", "ein sehr langer deutscher Satz über ein Bild", "ok", "zwei"]
        langs = ["en", "de", "en", "de"]
        env = DistEnv(rank=rank, world_size=world, mode="ddp")
        ddp = wrap_model(model, env)
        mine = {"pixels": pixels[2 * rank:2 * rank + 2], "target": targets[2 * rank:2 * rank + 2],
                "lang": langs[2 * rank:2 * rank + 2]}
        res = finetune.lm_step(ddp, model, [model.prepare_batch(mine)], env=env, precision="fp32")
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        if rank == 0:  # the single-process reference on all four samples
            torch.manual_seed(0)
            ref = VisionLLM(cfg).train()
            one = finetune.lm_step(ref, ref, [ref.prepare_batch({"pixels": pixels, "target": targets, "lang": langs})],
                                   env=DistEnv(), precision="fp32")
            diff = max(float((a - p.grad).abs().max()) for a, p in
                       zip(grads, [p for p in ref.parameters() if p.requires_grad]))
            Path(out).write_text(json.dumps({"ddp": res["lm_loss"], "single": one["lm_loss"], "diff": diff,
                                             "tokens": [res["tokens"], one["tokens"]]}))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_ddp_token_normalisation_matches_single_process(tmp_path):
    """Two ranks with different target-token counts: the DDP gradient equals the one-process gradient of
    the union batch (counts all-reduced, loss divided by count / world_size)."""
    import torch.multiprocessing as mp

    from vlm.distributed import free_port

    out = tmp_path / "res.json"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    r = json.loads(out.read_text())
    assert r["tokens"][0] == r["tokens"][1]
    assert abs(r["ddp"] - r["single"]) < 1e-5 and r["diff"] < 1e-6, r


def test_precision_auto_is_resolved(demo, tmp_path):
    """A config that leaves train.precision at its default (auto) trains: the one setup resolves it."""
    import yaml

    out = finetune.run(make_cfg(demo, tmp_path / "auto", **{"train.precision": "auto", "train.steps": 1,
                                                            "val_data": "null"}))
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert out["step"] == 1 and saved["train"]["precision"] in ("bf16", "fp32")
