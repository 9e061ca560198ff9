"""GGUF checkpoints through ``hf:FILE.gguf``: a tiny Llama written as llama.cpp writes GGUF (the ``gguf``
package's GGUFWriter, llama.cpp's tensor names and q/k row permutation, a byte-level BPE tokenizer in
``tokenizer.ggml.*``), loaded by transformers' own GGUF reader, fine-tuned and saved."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from vlm import registry  # noqa: E402
from vlm.llms.hf import LLMLoadError  # noqa: E402


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers' reader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, seed=0):
    """A 2-layer width-32 Llama + its BPE tokenizer as a GGUF file; returns the HF model it was made from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.llms.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(corpus=["Ein Hund läuft. a dog runs", "the dog and the cat run"] * 20)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    import json

    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    specials = set(tok.all_special_tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_add_bos_token(True)  # our tokenizer puts bos first; llama.cpp records that in the file
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for k, v in model.state_dict().items():
        arr = v.detach().float().numpy()
        if k.endswith("q_proj.weight"):
            arr = _permute(arr, 4)
        elif k.endswith("k_proj.weight"):
            arr = _permute(arr, 2)
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        assert name, k
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


def test_gguf_llm_loads_finetunes_and_saves(tmp_path):
    path = tmp_path / "tiny-llama.F32.gguf"
    ref, ref_tok = write_tiny_llama_gguf(path)
    llm = registry.build("llm", f"hf:{path}")
    assert llm.base_model.config.model_type == "llama"
    assert getattr(llm.base_model, "hf_quantizer", None) is None  # detached: it saves like a float model
    # same weights as the model written (the q/k permutation undone), so the same logits on the same ids
    text = "Ein Hund läuft. a dog runs"
    ids = ref_tok(text, return_tensors="pt")["input_ids"]
    assert llm.tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = llm.model(input_ids=ids).logits[..., :want.shape[-1]]
    assert torch.allclose(got, want, atol=1e-5)
    # save_pretrained works (quantizer detached) and the directory loads through hf: with the same weights
    out = llm.save_pretrained(tmp_path / "saved")
    again = registry.build("llm", f"hf:{out}")
    a, b = llm.base_model.state_dict(), again.base_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a LoRA step through peft on the GGUF-loaded model; the adapter saves in peft's format
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(llm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.save_pretrained(str(tmp_path / "lora"))
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_gguf_missing_file_is_one_line(tmp_path):
    with pytest.raises(LLMLoadError, match="does not exist"):
        registry.build("llm", f"hf:{tmp_path / 'nope.gguf'}")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(LLMLoadError, match="GGUF"):
        registry.build("llm", f"hf:{bad}")


def test_gguf_text_tower_loads_through_hf_spec(tmp_path):
    """``hf:FILE.gguf`` as a tower: transformers' GGUF reader gives the config, the float weights and the
    tokenizer; the tower's pooled output equals the written model's own hidden states, pooled the same way."""
    from vlm.towers.base import pool_tokens

    path = tmp_path / "tiny-llama-encoder.F32.gguf"
    ref, ref_tok = write_tiny_llama_gguf(path, seed=1)
    tower = registry.build("tower", f"hf:{path}", side="text", pooling="mean", context_length=16)
    assert getattr(tower.core, "hf_quantizer", None) is None and tower.core.config.model_type == "llama"
    texts = ["Ein Hund läuft.", "the dog and the cat run"]
    batch = tower.tokenizer(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 16)
    first = ref_tok(texts[0])["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == first  # the file's own tokenizer, not a stand-in
    with torch.no_grad():
        got = tower.encode(ids, mask)
        want = pool_tokens(ref.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, "mean")
    got = got[0] if isinstance(got, tuple) else got
    assert got.shape == (2, 32) and torch.allclose(got, want, atol=1e-5)
    # the same file is a dual-encoder text tower a recipe trains: gradients reach the dequantised weights
    out = tower.encode(ids, mask)
    (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
    assert tower.core.embed_tokens.weight.grad is not None
