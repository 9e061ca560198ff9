"""DualToken as the tower of a vision-LLM (understanding): pixel tokens widen the features, not the sequence;
the tokenizer (new or saved) fine-tunes through task: finetune and the saved model captions."""
import pytest
import torch
from torch import nn

from vlm import registry
from vlm.vision_llm import VisionLLM, VisionLLMConfig

KW = dict(codebook_size=16, depth=2, code_dim=8, decoder_channels=16)


def _tok():
    torch.manual_seed(0)
    return registry.build("tower", "dualtoken:tiny:vit", **KW)


class SemanticHalf(nn.Module):
    """The same tokenizer's semantic features only (what a vision-LLM on the semantic path alone would see)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.width, self.num_tokens, self.preprocess = tok.backbone_width, tok.num_tokens, tok.preprocess

    def forward(self, pixels):
        tokens, aux = self.tok(pixels)
        return tokens[..., self.tok.backbone_width:], aux


def _batch(n=2):
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
            "target": ["a red circle", "ein blaues Quadrat"][:n], "lang": ["en", "de"][:n]}


def test_pixel_tokens_do_not_lengthen_the_llm_sequence():
    tok = _tok()
    cfg = VisionLLMConfig(tower="dualtoken:tiny:vit", tower_cfg=KW, llm="tiny:llama")
    dual = VisionLLM(cfg, tower=tok)
    sem = VisionLLM(VisionLLMConfig(tower="dualtoken:tiny:vit", tower_cfg=KW, llm="tiny:llama"),
                    tower=SemanticHalf(tok))
    plain = VisionLLM(VisionLLMConfig(tower="tiny:vit", llm="tiny:llama"))
    assert tok.width == 2 * tok.backbone_width  # pixel | semantic along the feature dim
    assert dual.num_image_tokens == sem.num_image_tokens == tok.num_tokens == tok.grid[0] * tok.grid[1]
    assert dual.projector(torch.zeros(1, tok.num_tokens, tok.width))[0].shape[1] == tok.num_tokens
    b = _batch()
    pd, ps = dual.prepare_batch(dict(b)), sem.prepare_batch(dict(b))
    assert pd["input_ids"].shape == ps["input_ids"].shape
    assert torch.equal(pd["input_ids"], ps["input_ids"])
    with torch.no_grad():
        e_dual, aux = dual.embed_inputs(b["pixels"], pd["input_ids"], pd["attention_mask"])
        e_sem, _ = sem.embed_inputs(b["pixels"], ps["input_ids"], ps["attention_mask"])
    assert e_dual.shape == e_sem.shape  # same sequence length and LLM width
    assert any(k.startswith("img/vq/") for k in aux)  # the tokenizer's code usage reaches the model's aux
    # the plain backbone: as many image positions as its own token grid, never more
    assert plain.num_image_tokens >= tok.num_tokens
    out = dual(b)
    assert torch.isfinite(out["lm_loss"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlm.data_recipes.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"), train=32, val=8, size=32, train_shards=1, val_shards=1,
                      langs=["en", "de"])


@pytest.mark.parametrize("saved", [False, True])
def test_finetune_on_a_dualtoken_tower_then_caption(tmp_path, demo, saved):
    from vlm.config import load_config
    from vlm.train.cli import CONFIG_DIR
    from vlm.train.finetune import FinetuneConfig, run

    opts = "{codebook_size: 16, depth: 2, code_dim: 8, decoder_channels: 16}"
    if saved:
        d = _tok().save_pretrained(tmp_path / "tok")
        tower = [f"model.tower=dualtoken:{d}", "model.tower_cfg={}"]
    else:
        tower = ["model.tower=dualtoken:tiny:vit", f"model.tower_cfg={opts}"]
    cfg = load_config(FinetuneConfig, CONFIG_DIR / "finetune_demo.yaml", [
        f"data.shards={demo.train_spec}", f"train.run_dir={tmp_path / 'run'}", "val_data=null", "mix=null",
        "train.steps=2", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0", "train.ckpt_every=0",
        "train.progress=false", "train.tensorboard=false", "model.llm_cfg={hidden_size: 32, num_layers: 1}",
        "optim.warmup_steps=1", *tower])
    summary = run(cfg)
    model = VisionLLM.from_pretrained(summary["final_dir"])
    assert model.num_image_tokens == model.tower.num_tokens
    texts = model.generate(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), lang="de", max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
