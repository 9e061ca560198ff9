"""Tiny random-init LLMs of each supported family, with an offline multilingual tokenizer (tests, demos).

Specs: ``tiny:llama``, ``tiny:qwen2``, ``tiny:gemma``, ``tiny:bloom`` (causal) and ``tiny:mt5`` (seq2seq).
Each builds the real transformers class of that family (``LlamaForCausalLM``, ``MT5ForConditionalGeneration``
...) from a small config (hidden 32, 2 layers, 4 heads), so every code path a real checkpoint takes (peft
target-module names, generate, save_pretrained) is exercised. Weights are drawn from a seeded generator
(``seed`` option, default 0) without touching the global RNG, so rebuilding a spec gives the same model.

Tokenizer (:func:`build_tiny_tokenizer`): byte-level BPE (GPT-2's byte alphabet, no merges), so it covers
every script with 256 symbols, wrapped in ``PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk>``, the image
placeholder ``<image>`` and one target-language token per known language (``<2de>``, ``<2hi>``, ... from
:data:`vlm.data.langs.LANGUAGES`) as added special tokens. It round-trips through
``save_pretrained``/``AutoTokenizer.from_pretrained``, so ``LanguageModel.save_pretrained(dir)`` followed
by ``registry.build("llm", f"hf:{dir}")`` loads the tiny model through the real ``hf:`` path. Causal
families get ``<s>`` prepended (like Llama), mT5 gets ``</s>`` appended (like T5's tokenizer).

Options (all specs): ``hidden_size`` (32), ``num_layers`` (2), ``num_heads`` (4), ``seed`` (0),
``dtype`` (None = float32), ``langs`` (None = all known codes; the language tokens to add).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from vlm.errors import UserError
from vlm.llms.base import IMAGE_TOKEN, LanguageModel, lang_token, resolve_dtype
from vlm.registry import register_family

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def _all_lang_codes() -> list[str]:
    from vlm.data.langs import LANGUAGES

    return sorted(LANGUAGES)


def build_tiny_tokenizer(langs: list[str] | None = None, add_bos: bool = True, add_eos: bool = False,
                         corpus: Iterable[str] | None = None, vocab_size: int = 2048):
    """Byte-level BPE tokenizer with pad/bos/eos/unk, ``<image>`` and ``<2xx>`` language tokens.

    ``add_bos``/``add_eos``: what ``tok(text)`` adds around a sequence (causal LMs: bos; T5-style: eos).
    ``corpus``: texts to learn BPE merges from (``tokenizers``' ``BpeTrainer``, up to ``vocab_size`` entries
    before the added tokens), as any LLM's tokenizer is trained on its corpus; without it there are no
    merges (one token per UTF-8 byte). Either way all 256 bytes are in the vocabulary, so every script
    still encodes. Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if corpus is None:
        vocab = {t: i for i, t in enumerate([*SPECIALS, *alphabet])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.pre_tokenizer = pre
    else:
        if vocab_size < len(SPECIALS) + len(alphabet):
            raise UserError(f"vocab_size {vocab_size} is below the {len(SPECIALS) + len(alphabet)} entries every "
                             "byte-level tokenizer needs (4 specials + 256 bytes)")
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      initial_alphabet=alphabet, show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
    tok.decoder = decoders.ByteLevel()
    single = " ".join((["<s>"] if add_bos else []) + ["$A"] + (["</s>"] if add_eos else []))
    pair = " ".join((["<s>"] if add_bos else []) + ["$A", "$B"] + (["</s>"] if add_eos else []))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    extra = [IMAGE_TOKEN] + [lang_token(c) for c in (langs if langs is not None else _all_lang_codes())]
    tok.add_special_tokens([*SPECIALS, *extra])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=extra, model_max_length=4096)


def _llama(v: int, h: int, n: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False))


def _qwen2(v: int, h: int, n: int, heads: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=True))


def _gemma(v: int, h: int, n: int, heads: int):
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(
        vocab_size=v, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=1, head_dim=h // heads, max_position_embeddings=1024, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID))


def _bloom(v: int, h: int, n: int, heads: int):
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(
        vocab_size=v, hidden_size=h, n_layer=n, n_head=heads, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID))


def _mt5(v: int, h: int, n: int, heads: int):
    from transformers import MT5Config, MT5ForConditionalGeneration

    return MT5ForConditionalGeneration(MT5Config(
        vocab_size=v, d_model=h, d_kv=h // heads, d_ff=2 * h, num_layers=n, num_decoder_layers=n, num_heads=heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID, tie_word_embeddings=False))


TINY_FAMILIES: dict[str, tuple[Callable, bool]] = {  # name -> (model factory, is seq2seq)
    "llama": (_llama, False), "qwen2": (_qwen2, False), "gemma": (_gemma, False), "bloom": (_bloom, False),
    "mt5": (_mt5, True),
}


def build_tiny_llm(family: str, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                   dtype: str | torch.dtype | None = None, langs: list[str] | None = None,
                   tokenizer=None) -> LanguageModel:
    """Random-init ``family`` LM (see :data:`TINY_FAMILIES`) with the tiny tokenizer -> ``LanguageModel``.

    ``tokenizer``: one from :func:`build_tiny_tokenizer` (e.g. with BPE merges learned from a corpus) to use
    instead of the merge-free byte tokenizer; its ``add_bos``/``add_eos`` must suit the family."""
    if family not in TINY_FAMILIES:
        raise UserError(f"unknown tiny LLM family {family!r}; choose one of "
                         f"{', '.join('tiny:' + f for f in TINY_FAMILIES)}")
    if hidden_size % num_heads:
        raise UserError(f"tiny:{family}: hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    factory, seq2seq = TINY_FAMILIES[family]
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer(langs, add_bos=not seq2seq, add_eos=seq2seq)
    for name, want in (("<pad>", PAD_ID), ("<s>", BOS_ID), ("</s>", EOS_ID), (IMAGE_TOKEN, None)):
        got = tok.convert_tokens_to_ids(name)
        if got is None or got == tok.unk_token_id or (want is not None and got != want):
            raise UserError(f"tiny:{family}: the tokenizer must have {name}" + (f" at id {want}" if want is not None
                            else "") + "; build it with vlm.llms.tiny.build_tiny_tokenizer")
    vocab = len(tok)
    vocab += (-vocab) % 8  # round up, like real checkpoints (rows past len(tok) are never produced by it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(vocab, hidden_size, num_layers, num_heads)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    dt = resolve_dtype(dtype)
    if dt is not None:
        model.to(dt)
    return LanguageModel(model.eval(), tok, source=f"tiny:{family}")


@register_family("llm", "tiny", examples=tuple(f"tiny:{f}" for f in TINY_FAMILIES),
                 help="tiny random-init LLM of a family (hidden 32, 2 layers) with an offline tokenizer")
def _tiny_family(name: str, **cfg) -> LanguageModel:
    return build_tiny_llm(name, **cfg)
