"""DHO distillation (task: distill) and language-specific text students (task: distill_text): the heads and
the loss, the teacher cache (the teacher runs once per image), exact resume, the saved students loading
through the user-facing loaders."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm.checkpoint import load_weights
from vlm.cli import main
from vlm.config import from_dict
from vlm.distill import DHOConfig, DHOStudent, TeacherEmbeddingCache, dho_loss, mix_heads
from vlm.errors import UserError
from vlm.model import DualEncoder, DualEncoderConfig, load_model
from vlm.train import distill, distill_text

RUN = {"dist": "none", "device": "cpu", "precision": "fp32", "progress": False, "tensorboard": False,
       "log_every": 1, "resume": None, "threads": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo
    from vlm.data.decode import expand_shards

    root = tmp_path_factory.mktemp("distill")
    demo = build_demo(root / "demo", train=60, val=20, size=32, train_shards=3, val_shards=1)
    torch.manual_seed(0)
    teacher = DualEncoder.from_config(DualEncoderConfig(text_tower="ngram:text",
                                                        text_tower_cfg={"width": 32, "buckets": 4096}))
    teacher.save_pretrained(root / "teacher")
    return {"root": root, "demo": demo, "teacher": root / "teacher", "urls": expand_shards(demo.train_spec)}


def _dho_cfg(setup, run_dir, **train):
    u = setup["urls"]
    return from_dict(distill.DistillConfig, {
        "task": "distill", "teacher": {"model": str(setup["teacher"]), "batch_size": 16},
        "data": {"shards": u[0], "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
        "unlabelled_data": {"shards": u[1:], "batch_size": 6, "num_workers": 0, "shuffle_buffer": 8},
        "train": {**RUN, "steps": 12, "run_dir": str(run_dir), "ckpt_every": 4, **train},
        "optim": {"warmup_steps": 1, "lr": 1e-3}})


def _student(C=5):
    torch.manual_seed(1)
    return DHOStudent.from_config(DHOConfig(class_ids=list(range(C)), class_names=[f"c{i}" for i in range(C)]))


# ------------------------------------------------------------------------------------------- heads, loss
def test_alpha_one_is_the_ce_head_and_alpha_zero_the_kd_head():
    s = _student().eval()
    px = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    out = s(px)
    assert torch.equal(s.predict_proba(px, alpha=1.0), F.softmax(out["ce_logits"], -1))
    assert torch.allclose(s.predict_proba(px, alpha=0.0, beta=0.5), F.softmax(out["kd_logits"] / 0.5, -1))
    mixed = s.predict_proba(px)  # the saved alpha = beta = 0.5
    want = 0.5 * F.softmax(out["ce_logits"], -1) + 0.5 * F.softmax(out["kd_logits"] / 0.5, -1)
    assert torch.allclose(mixed, want) and torch.allclose(mixed.sum(-1), torch.ones(3))
    # the KD head is 100 x W_kd normalize(f(x))
    f = F.normalize(out["features"], dim=-1)
    assert torch.allclose(out["kd_logits"], 100 * f @ s.kd_head.weight.t(), atol=1e-4)
    with pytest.raises(UserError, match="alpha"):
        mix_heads(out["ce_logits"], out["kd_logits"], alpha=1.5)


def test_loss_matches_the_dho_formula():
    torch.manual_seed(0)
    ce, kd, t = torch.randn(6, 5), torch.randn(6, 5) * 3, torch.randn(6, 5) * 10
    y = torch.tensor([1, 4, -100, 2, -100, -100])
    lab = torch.tensor([True, True, True, False, False, False])  # row 2: labelled stream, no target
    got = dho_loss({"ce_logits": ce, "kd_logits": kd}, y, t, lab, temperature=2.0)
    T = 2.0

    def kl(rows):
        return F.kl_div(F.log_softmax(kd[rows] / T, -1), F.softmax(t[rows] / T, -1), reduction="batchmean") * T * T
    assert torch.allclose(got["ce_loss"], F.cross_entropy(ce[:2], y[:2]))
    assert torch.allclose(got["kd_labelled_loss"], kl(slice(0, 3)), atol=1e-5)
    assert torch.allclose(got["kd_unlabelled_loss"], kl(slice(3, 6)), atol=1e-5)


def test_unlabelled_rows_give_no_gradient_to_the_ce_head():
    s = _student()
    px = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    t = torch.randn(6, 5) * 10
    lab = torch.tensor([True, True, False, False, False, False])
    y = torch.tensor([0, 3, -100, -100, -100, -100])

    def grads(rows_y, rows_lab):
        s.zero_grad()
        sum(dho_loss(s(px), rows_y, t, rows_lab).values()).backward()
        return s.ce_head.weight.grad.clone(), s.kd_head.weight.grad.clone()

    only_unlabelled = grads(torch.full((6,), -100), torch.zeros(6, dtype=torch.bool))
    assert torch.count_nonzero(only_unlabelled[0]) == 0 and torch.count_nonzero(only_unlabelled[1]) > 0
    # the CE head's gradient from a mixed batch is that of its labelled rows alone
    mixed = grads(y, lab)
    s.zero_grad()
    F.cross_entropy(s(px)["ce_logits"][:2], y[:2]).backward()
    assert torch.allclose(mixed[0], s.ce_head.weight.grad, atol=1e-6)


def test_cache_is_keyed_by_sample_and_refuses_another_teacher(tmp_path):
    c = TeacherEmbeddingCache(tmp_path / "c", "teacher-a")
    c.add(["s1#a", "s1#b"], torch.eye(2, 4))
    c.flush()
    again = TeacherEmbeddingCache(tmp_path / "c", "teacher-a")
    assert len(again) == 2 and torch.equal(again.get(["s1#b", "s1#a"]), torch.eye(2, 4)[[1, 0]])
    with pytest.raises(UserError, match="no embedding"):
        again.get(["s2#a"])
    with pytest.raises(UserError, match="another teacher"):
        TeacherEmbeddingCache(tmp_path / "c", "teacher-b")


# ------------------------------------------------------------------------------------------- recipe
def test_teacher_runs_once_per_image_and_resume_is_exact(setup, tmp_path, monkeypatch):
    calls = []
    orig = DualEncoder.encode_image

    def counting(self, pixels, *a, **kw):
        calls.append(pixels.shape[0])
        return orig(self, pixels, *a, **kw)
    monkeypatch.setattr(DualEncoder, "encode_image", counting)
    # 12 steps x (4 + 6) images = 120 draws over 60 images: two epochs of both streams
    straight = distill.run(_dho_cfg(setup, tmp_path / "a"))
    assert sum(calls) == 60 and straight["teacher_images_embedded"] == 60 and straight["step"] == 12
    calls.clear()
    first = distill.run(_dho_cfg(setup, tmp_path / "b", stop_after=6))
    assert first["final_dir"] is None and sum(calls) == 60
    calls.clear()
    resumed = distill.run(_dho_cfg(setup, tmp_path / "b", resume="latest"))
    assert sum(calls) == 0 and resumed["step"] == 12  # the resumed run reads the cache its first part wrote
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(straight["loss"]) and straight["loss"] < straight["first_loss"]


def test_student_saves_loads_and_vlm_eval_classify_scores_it(setup, tmp_path, capsys):
    cfg = _dho_cfg(setup, tmp_path / "r", steps=3, ckpt_every=0)
    summary = distill.run(cfg)
    final = Path(summary["final_dir"])
    s = DHOStudent.from_pretrained(final)
    labels = json.loads(Path(setup["demo"].labels).read_text())
    assert s.config.class_ids == labels["EN"][0] and s.config.class_names == labels["EN"][1]
    px = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    ref = DHOStudent.from_config(s.config)
    ref.load_state_dict(load_weights(final / "model.safetensors"))
    assert torch.equal(s.eval()(px)["ce_logits"], ref.eval()(px)["ce_logits"])
    out = tmp_path / "rep"
    assert main(["eval", "classify", "--model", str(final), "--images", setup["demo"].val_spec, "--out", str(out),
                 "--workers", "0", "--no-progress", "--alpha", "0.7"]) == 0
    rep = json.loads((out / "classify.json").read_text())
    assert set(rep["per_language"]) == {"mixed", "ce", "kd"} and rep["alpha"] == 0.7
    assert all(r["n_images"] == 20 and 0 <= r["top1"] <= 100 for r in rep["per_language"].values())
    assert main(["eval", "classify", "--model", str(setup["teacher"]), "--images", setup["demo"].val_spec]) == 2
    assert "not a saved classifier student" in capsys.readouterr().err


def test_bad_teacher_is_one_line(setup, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: distill\nteacher: {{model: {tmp_path / 'nope'}}}\ndata: {{shards: '{setup['urls'][0]}'}}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "teacher.model" in err


# ------------------------------------------------------------------------------------------- text students
def _text_cfg(setup, run_dir, steps=12, **kw):
    return from_dict(distill_text.DistillTextConfig, {
        "task": "distill_text", "teacher": str(setup["teacher"]), "languages": ["en", "de"],
        "model": {"text_tower": "ngram:text", "text_tower_cfg": {"width": 16, "buckets": 2048}},
        "data": {"shards": setup["demo"].train_spec, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 8},
        "train": {**RUN, "steps": steps, "run_dir": str(run_dir), "ckpt_every": 0}, "optim": {"warmup_steps": 1,
                                                                                               "lr": 3e-3}, **kw})


def _caption_texts(setup, langs):
    from vlm.data_recipes.demo import render_caption

    return [render_caption(lang, label, colour, 0) for lang in langs for label in range(10) for colour in range(0, 8, 3)]


def test_text_student_approaches_the_teacher_and_loads_as_a_dual_encoder(setup, tmp_path):
    from vlm.distill.text_student import build_text_student, text_params
    from vlm.eval.zeroshot import make_text_encoder

    teacher = load_model(setup["teacher"]).eval()
    texts = _caption_texts(setup, ["en", "de"])
    t_emb = make_text_encoder(teacher)(texts)
    torch.manual_seed(0)
    untrained = build_text_student(load_model(setup["teacher"]), "ngram:text", {"width": 16, "buckets": 2048}).eval()
    before = (1 - (make_text_encoder(untrained)(texts) * t_emb).sum(-1)).mean().item()
    summary = distill_text.run(_text_cfg(setup, tmp_path / "t", steps=30, stage1_fraction=1.0))
    student = load_model(summary["final_dir"]).eval()  # the user-facing loader: a complete dual encoder
    after = (1 - (make_text_encoder(student)(texts) * t_emb).sum(-1)).mean().item()
    assert after < 0.6 * before, (before, after)
    assert text_params(student) < text_params(teacher)
    # the image side is the teacher's, bit for bit; the saved config is the teacher's trainable settings
    px = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(student.encode_image(px), teacher.encode_image(px))
    assert student.config.trainable == teacher.config.trainable and student.config.frozen == []


def test_text_student_stage_two_and_resume_exact(setup, tmp_path):
    straight = distill_text.run(_text_cfg(setup, tmp_path / "a", steps=8, stage2_match_weight=0.5))
    first = distill_text.run(_text_cfg(setup, tmp_path / "b", steps=8, stage2_match_weight=0.5,
                                       train={**RUN, "steps": 8, "run_dir": str(tmp_path / "b"), "ckpt_every": 0,
                                              "stop_after": 5}))
    assert first["final_dir"] is None
    distill_text.run(_text_cfg(setup, tmp_path / "b", steps=8, stage2_match_weight=0.5,
                               train={**RUN, "steps": 8, "run_dir": str(tmp_path / "b"), "ckpt_every": 0,
                                      "resume": "latest"}))
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    stages = [r["stage"] for r in recs if "stage" in r]
    assert stages == [1, 1, 1, 1, 2, 2, 2, 2] and any("contrastive_loss" in r for r in recs)
    a = load_weights(tmp_path / "a" / "final" / "model.safetensors")
    b = load_weights(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_embedder_from_a_vision_llm_is_a_dho_teacher(setup, tmp_path):
    """The teacher is loaded by directory through load_model, so a vision-LLM embedder (issue 12 item 1)
    teaches a DHO student like a dual encoder does."""
    from vlm.embedder import Embedder, EmbedderConfig
    from vlm.vision_llm import VisionLLMConfig

    torch.manual_seed(0)
    Embedder.from_config(EmbedderConfig(base=VisionLLMConfig())).save_pretrained(tmp_path / "emb")
    cfg = _dho_cfg({**setup, "teacher": tmp_path / "emb"}, tmp_path / "run", steps=4, ckpt_every=4)
    out = distill.run(cfg)
    assert out["teacher_images_embedded"] == 60 and out["step"] == 4 and math.isfinite(out["loss"])
    assert (Path(out["final_dir"]) / "model.safetensors").is_file()
