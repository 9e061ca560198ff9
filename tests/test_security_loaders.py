"""A model directory is data, never permission to run code (issue 10, security item 1; :mod:`vlm.remote_code`).

Each test builds a hostile directory: a tiny transformers model whose ``config.json`` has an ``auto_map``
naming ``modeling_evil.py`` next to it, a module that writes a marker file when imported; or a pickle that
writes the marker when unpickled. Loading through the user's code paths (``VisionLLM.from_pretrained``,
``vlm caption``, ``DualEncoder.from_pretrained``, ``registry.build`` of ``hf:`` / ``vlm:`` / ``open_clip:``
/ ``qformer:hf:`` specs) must never create the marker, whatever the saved config says; an explicit
``trust_remote_code=True`` / ``--trust-remote-code`` does (which shows the hostile code is real).
"""
import json
import uuid

import pytest
import torch

from vlm import registry
from vlm.errors import UserError

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")

from transformers import {base}Config, {base}{model}


class Evil{base}Config({base}Config):
    model_type = {model_type!r}


class Evil{base}{model}({base}{model}):
    config_class = Evil{base}Config
'''


def _make_evil(d, marker, base: str, model: str, auto_class: str, model_type: str | None = None):
    """Put ``modeling_evil.py`` in the transformers dir ``d`` and an ``auto_map`` to it in its config.json;
    ``model_type`` (if given) replaces the one transformers knows, so only the shipped code can load it."""
    cfg = json.loads((d / "config.json").read_text())
    model_type = model_type or cfg["model_type"]
    (d / "modeling_evil.py").write_text(EVIL.format(marker=str(marker), base=base, model=model,
                                                    model_type=model_type))
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": f"modeling_evil.Evil{base}Config",
                       auto_class: f"modeling_evil.Evil{base}{model}"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _one_line_user_error(excinfo, *words):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError) and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------------------------------ vision-LLM
@pytest.fixture()
def hostile_vllm(tmp_path):
    """(saved vision-LLM dir whose config.json says llm=hf:<evil dir>, llm_cfg={trust_remote_code: true},
    evil LLM dir, marker path). The evil dir holds the model's own tiny LLM, so with the code trusted it loads."""
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    marker = tmp_path / "marker"
    model = VisionLLM(VisionLLMConfig(llm_cfg={"hidden_size": 32, "num_layers": 1}))
    d = model.save_pretrained(tmp_path / "vllm")
    evil = tmp_path / f"evil_llm_{uuid.uuid4().hex[:8]}"  # a fresh module name: imported anew in each test
    base = registry.build("llm", "tiny:llama", hidden_size=32, num_layers=1)  # the same (seeded) weights
    base.model.save_pretrained(str(evil))
    base.tokenizer.save_pretrained(str(evil))
    _make_evil(evil, marker, "Llama", "ForCausalLM", "AutoModelForCausalLM")
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["llm"] = f"hf:{evil}"
    meta["config"]["llm_cfg"] = {"trust_remote_code": True}
    (d / "config.json").write_text(json.dumps(meta))
    return d, evil, marker


def test_vision_llm_config_cannot_turn_on_remote_code(hostile_vllm):
    from vlm.vision_llm import VisionLLM

    d, _, marker = hostile_vllm
    model = VisionLLM.from_pretrained(d)  # transformers' own Llama class: the shipped code is not imported
    assert not marker.exists()
    assert "trust_remote_code" not in model.config.llm_cfg  # stripped: a re-save does not carry it on
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["llm_cfg"].update(code_revision="main", weights_only=False)  # the other code-enabling keys
    meta["config"]["tower_cfg"].update(trust_remote_code=True)
    (d / "config.json").write_text(json.dumps(meta))
    VisionLLM.from_pretrained(d)
    assert not marker.exists()
    VisionLLM.from_pretrained(d, trust_remote_code=True)  # the user's explicit opt-in
    assert marker.exists()


def test_cli_caption_never_runs_model_code_unless_flagged(hostile_vllm, tmp_path, capsys):
    from PIL import Image

    from vlm.cli import main

    d, _, marker = hostile_vllm
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    assert main(["caption", str(img), "--model", str(d), "--max-new-tokens", "2"]) == 0
    assert not marker.exists()
    capsys.readouterr()
    assert main(["caption", str(img), "--model", str(d), "--max-new-tokens", "2", "--trust-remote-code"]) == 0
    assert marker.exists()


def test_cli_model_that_needs_its_code_is_a_one_line_error(hostile_vllm, capsys):
    from vlm.cli import main

    d, evil, marker = hostile_vllm
    cfg = json.loads((evil / "config.json").read_text())
    cfg["model_type"] = "evil_llm"  # no transformers class of its own: only the shipped code loads it
    (evil / "config.json").write_text(json.dumps(cfg))
    from PIL import Image

    img = evil.parent / "img.png"
    Image.new("RGB", (32, 32)).save(img)
    capsys.readouterr()
    assert main(["vqa", str(img), "--model", str(d), "--question", "what?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm vqa: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--trust-remote-code" in err and str(evil) in err
    assert not marker.exists()


def test_hf_llm_spec_needs_the_call_argument(hostile_vllm):
    _, evil, marker = hostile_vllm
    cfg = json.loads((evil / "config.json").read_text())
    cfg["model_type"] = "evil_llm"
    (evil / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        registry.build("llm", f"hf:{evil}")
    _one_line_user_error(e, "--trust-remote-code", str(evil))
    with pytest.raises(UserError) as e:  # a hub kernel is code from the Hub too
        registry.build("llm", f"hf:{evil}", attn_implementation="kernels-community/flash-attn")
    _one_line_user_error(e, "hub kernel")
    assert not marker.exists()
    llm = registry.build("llm", f"hf:{evil}", trust_remote_code=True)
    assert marker.exists() and type(llm.model).__name__ == "EvilLlamaForCausalLM"


# ------------------------------------------------------------------------------------------ dual encoder
@pytest.fixture()
def hostile_dual(tmp_path):
    """(saved dual encoder whose hf text tower folder ships code and whose config.json asks to trust it,
    marker path)."""
    from transformers import BertConfig, BertModel

    from test_towers import make_tokenizer
    from vlm.model import DualEncoder

    marker = tmp_path / "marker"
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=64, max_position_embeddings=40, pad_token_id=0, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(str(bert))
    make_tokenizer().save_pretrained(str(bert))
    de = DualEncoder.from_config({"image_tower": "tiny:vit", "text_tower": f"hf:{bert}", "embed_dim": 16})
    d = de.save_pretrained(tmp_path / f"dual_{uuid.uuid4().hex[:8]}")
    _make_evil(d / "text_tower", marker, "Bert", "Model", "AutoModel", model_type="evil_bert")
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["text_tower_cfg"]["trust_remote_code"] = True
    (d / "config.json").write_text(json.dumps(meta))
    return d, marker


def test_dual_encoder_config_cannot_turn_on_remote_code(hostile_dual):
    from vlm.model import DualEncoder

    d, marker = hostile_dual
    with pytest.raises(UserError) as e:
        DualEncoder.from_pretrained(d)
    _one_line_user_error(e, "--trust-remote-code", "text_tower")
    with pytest.raises(UserError) as e:  # a vlm: tower reads the same saved model
        registry.build("tower", f"vlm:{d}", side="text")
    _one_line_user_error(e, "--trust-remote-code")
    assert not marker.exists()
    model = DualEncoder.from_pretrained(d, trust_remote_code=True)
    assert marker.exists() and type(model.text_tower.core).__name__ == "EvilBertModel"


def test_hf_tower_never_asks_and_never_runs_code(hostile_dual):
    d, marker = hostile_dual
    with pytest.raises(UserError) as e:  # transformers' default would prompt on a terminal
        registry.build("tower", f"hf:{d / 'text_tower'}", load_weights=False)
    _one_line_user_error(e, "--trust-remote-code")
    assert not marker.exists()


def _evil_pickle(path, marker):
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"weight": Evil()}, path)
    return path


def test_dual_encoder_config_cannot_point_at_a_pickle(tmp_path):
    """A saved tower option ``pretrained=<pickle>`` with ``weights_only=False`` is dropped: the weights are
    model.safetensors; and the open_clip tower refuses ``weights_only`` from anyone."""
    from test_towers import OC_ARCH, OC_CFG
    from vlm.model import DualEncoder
    from vlm.towers.open_clip import register_arch

    register_arch(OC_ARCH, OC_CFG)
    marker = tmp_path / "marker"
    evil = _evil_pickle(tmp_path / "evil.pt", marker)
    de = DualEncoder.from_config({"image_tower": f"open_clip:{OC_ARCH}", "text_tower": f"open_clip:{OC_ARCH}"})
    d = de.save_pretrained(tmp_path / "dual")
    meta = json.loads((d / "config.json").read_text())
    meta["config"]["image_tower_cfg"].update(pretrained=str(evil), weights_only=False)
    (d / "config.json").write_text(json.dumps(meta))
    DualEncoder.from_pretrained(d)
    assert not marker.exists()
    with pytest.raises(UserError) as e:
        registry.build("tower", f"open_clip:{OC_ARCH}", side="image", pretrained=str(evil), weights_only=False)
    _one_line_user_error(e, "weights_only")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ Q-Former
def test_qformer_hf_reads_only_tensors_of_its_directory(tmp_path):
    """``qformer:hf:<dir>`` reads JSON and safetensors only: an auto_map is never imported, and an index
    that names weight files outside the directory is refused."""
    from safetensors.torch import save_file

    marker = tmp_path / "marker"
    d = tmp_path / "blip2"
    d.mkdir()
    qc = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
          "encoder_hidden_size": 16, "cross_attention_frequency": 1}
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "config.json").write_text(json.dumps({"model_type": "evil_blip", "qformer_config": qc,
                                               "num_query_tokens": 4, "auto_map": {"AutoModel": "modeling_evil.X"},
                                               "trust_remote_code": True}))
    sd = {"query_tokens": torch.zeros(1, 4, 32)}
    outside = tmp_path / "elsewhere.safetensors"
    save_file(sd, str(outside))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../elsewhere.safetensors"
                                                                               for k in sd}}))
    with pytest.raises(UserError) as e:
        registry.build("projector", f"qformer:hf:{d}", in_dim=16, out_dim=24)
    _one_line_user_error(e, "outside")
    assert not marker.exists()
