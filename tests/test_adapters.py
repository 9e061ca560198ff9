"""Adapters through peft: LoRA targets per family, injected in place, peft's own save format read back by plain
peft and by our loader, merged LoRA equal to unmerged, soft prompts with inputs_embeds, LoRA under a soft prompt."""
import pytest
import torch
from peft import PeftModel

from vlm import registry
from vlm.adapters.lora import LORA_TARGETS, LoraAdapter, merge_lora
from vlm.adapters.soft_prompt import PromptTuningAdapter, is_prompt_learning, prepend_soft_prompt
from vlm.errors import UserError



def _llm(family):
    return registry.build("llm", f"tiny:{family}")


def _inputs(llm, texts=("ein kleiner Hund", "नमस्ते")):
    enc = llm.tokenizer(list(texts), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, embeds, mask, ids):
    kw = {"labels": ids.masked_fill(mask == 0, -100)} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "bloom", "mt5"])
def test_lora_targets_per_family(family):
    llm = _llm(family)
    peft_model = registry.build("adapter", "lora", r=4, alpha=8).apply(llm.model)
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    hit = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert hit == set(LORA_TARGETS[family])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_spec_strings_and_errors():
    a = registry.build("adapter", "lora:r16-a32", dropout=0.0)
    assert (a.r, a.alpha, a.dropout) == (16, 32, 0.0)
    assert registry.build("adapter", "lora:r4").r == 4
    with pytest.raises(UserError, match="lora:r8"):
        registry.build("adapter", "lora:big")
    with pytest.raises(UserError, match="do not exist"):
        LoraAdapter(target_modules=["no_such_proj"]).apply(_llm("llama").model)
    model = _llm("llama").model
    model.config.model_type = "mystery"
    with pytest.raises(UserError, match="target_modules"):
        LoraAdapter().apply(model)
    p = LoraAdapter().apply(_llm("llama").model)
    with pytest.raises(UserError, match="already carries"):
        LoraAdapter().apply(p)


@pytest.mark.parametrize("family", ["llama", "mt5"])
def test_lora_peft_roundtrip_and_merge(tmp_path, family):
    llm = _llm(family)
    ids, mask = _inputs(llm)
    embeds = llm.embed(ids).detach()
    base = _logits(llm.model, embeds, mask, ids)
    # init_weights=False: random A and B, so the adapter changes the outputs and the test can fail
    adapter = LoraAdapter(r=4, alpha=8, dropout=0.0, init_weights=False)
    peft_model = adapter.apply(llm.model)
    assert peft_model is llm.model  # injected in place: the model keeps its type (generate, config, ...)
    adapted = _logits(peft_model, embeds, mask, ids)
    assert not torch.allclose(adapted, base, atol=1e-4)
    adapter.save(peft_model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # what a plain-peft user does: fresh base model + PeftModel.from_pretrained
    fresh = _llm(family).model
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded, embeds, mask, ids), adapted)
    ours = LoraAdapter.load(_llm(family).model, tmp_path / "adapter", "llm")
    torch.testing.assert_close(_logits(ours, embeds, mask, ids), adapted)
    merged = merge_lora(peft_model)
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, embeds, mask, ids), adapted, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mt5"])
def test_prompt_tuning_inputs_embeds_and_roundtrip(tmp_path, family):
    llm = _llm(family)
    ids, mask = _inputs(llm)
    embeds = llm.embed(ids).detach()
    adapter = registry.build("adapter", "prompt_tuning:3")
    assert isinstance(adapter, PromptTuningAdapter) and adapter.num_virtual_tokens == 3
    peft_model = adapter.apply(llm.model, "llm")
    assert is_prompt_learning(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt_encoder" in n for n in trainable)
    out = _logits(peft_model, embeds, mask, ids)
    L = ids.shape[1] if family == "mt5" else ids.shape[1] + 3  # causal logits cover the virtual tokens
    assert out.shape[1] == L
    # our prepend (used by VisionLLM.generate) is exactly what peft's forward does
    e2, m2 = prepend_soft_prompt(peft_model, embeds, mask)
    assert e2.shape[1] == ids.shape[1] + 3 and m2[:, :3].eq(1).all()
    kw = {"labels": ids.masked_fill(mask == 0, -100)} if family == "mt5" else {}
    with torch.no_grad():
        direct = peft_model.get_base_model()(inputs_embeds=e2, attention_mask=m2, **kw).logits
    torch.testing.assert_close(direct, out)
    # gradient reaches the soft prompt through inputs_embeds
    peft_model(inputs_embeds=embeds, attention_mask=mask, **kw).logits.sum().backward()
    assert peft_model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    want = _logits(peft_model, embeds, mask, ids)
    peft_model.save_pretrained(tmp_path / "pt")
    loaded = PeftModel.from_pretrained(_llm(family).model, str(tmp_path / "pt"))
    torch.testing.assert_close(_logits(loaded, embeds, mask, ids), want)
    with pytest.raises(UserError, match="prompt_tuning:<num_virtual_tokens>"):
        registry.build("adapter", "prompt_tuning:many")


@pytest.mark.parametrize("family", ["llama", "mt5"])
def test_lora_inside_a_soft_prompt(tmp_path, family):
    """lora+prompt: LoRA injected into the LLM, a peft soft prompt around it; both train, nothing else does;
    each is saved in its own peft folder and the pair loads back to the same logits."""
    from vlm import trainable as tr

    llm = _llm(family)
    ids, mask = _inputs(llm)
    embeds = llm.embed(ids).detach()
    lora, prompt = LoraAdapter(r=4, alpha=8, dropout=0.0), PromptTuningAdapter(num_virtual_tokens=2)
    model = prompt.apply(lora.apply(llm.model, "llm"), "llm")
    tr.mark_adapters_trainable(model, [lora, prompt])
    kw = {"labels": ids.masked_fill(mask == 0, -100)} if family == "mt5" else {}
    model(inputs_embeds=embeds, attention_mask=mask, **kw).logits.sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in got) and any("prompt_encoder" in n for n in got)
    assert all(lora.owns(n) or prompt.owns(n) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "prompt_encoder" in n:
                p.normal_(0, 0.3)
    want = _logits(model, embeds, mask, ids)
    lora.save(model.get_base_model(), tmp_path / "lora")
    prompt.save(model, tmp_path / "prompt")
    back = PromptTuningAdapter.load(LoraAdapter.load(_llm(family).model, tmp_path / "lora", "llm"), tmp_path / "prompt")
    torch.testing.assert_close(_logits(back, embeds, mask, ids), want)
    with pytest.raises(UserError, match="already a peft model"):
        prompt.apply(back, "llm")
