"""The embedder: a vision-LLM read out as a dual encoder (see the package docstring)."""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm.adapters.lora import LoraAdapter
from vlm.adapters.soft_prompt import PromptTuningAdapter, is_prompt_learning, prepend_soft_prompt
from vlm.config import ConfigError
from vlm.embedder.prompts import check_prompts, image_prompt, resolve_prompts, text_prompt
from vlm.errors import UserError
from vlm.llms.base import IMAGE_TOKEN
from vlm.vision_llm import VisionLLM, VisionLLMConfig

DEFAULT_TRAINABLE = {"tower": "frozen", "projector": "frozen", "llm": "lora+prompt"}
"""VladVA's choice: a soft prompt and LoRA on the LLM, everything else frozen (``trainable`` overrides)."""


@dataclass
class EmbedderConfig:
    """An embedder: which vision-LLM (a directory, or specs in ``base``), what trains, the prompts, the
    temperature of its contrastive logits."""

    vision_llm: str = ""
    """A vision-LLM directory (``VisionLLM.save_pretrained`` / ``vlm train`` finetune ``final``); its weights
    and adapters are the start. Empty: build ``base`` from its specs."""
    base: VisionLLMConfig = field(default_factory=VisionLLMConfig)
    trainable: dict[str, str] = field(default_factory=dict)
    """``{tower, projector, llm}`` modes for embedding tuning, over :data:`DEFAULT_TRAINABLE`. On a directory
    whose LLM carries a LoRA, ``lora`` continues that LoRA; a new adapter gets ``lora`` / ``prompt_tuning``."""
    lora: LoraAdapter = field(default_factory=lambda: LoraAdapter(r=8, alpha=16, dropout=0.0))
    prompt_tuning: PromptTuningAdapter = field(default_factory=PromptTuningAdapter)
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{lang: {system, image_instruction, image_suffix, text_instruction, text_suffix}}``, ``"*"``: any other
    language (:mod:`vlm.embedder.prompts`)."""
    default_lang: str = "en"
    lang_prompts: bool = False
    """True: a text gets the prompts of its own language when one is given (``encode_text(..., lang=)``): the
    embed recipe's batches, and ``vlm eval zeroshot|retrieval|compare``, which encode each language's class
    prompts and captions in that language. False: always ``default_lang``'s, in training and evaluation."""
    padding_side: Literal["left", "right"] = "right"
    max_text_length: int = 64
    """Tokens of a text kept (the prompt around it is never cut)."""
    init_logit_scale: float = math.log(1 / 0.02)
    """log of the inverse temperature (Gen2Embed: tau = 0.02)."""
    init_logit_bias: Optional[float] = None
    """SigLIP's bias (e.g. -10) for ``loss.name=siglip``; None: no bias."""
    learn_logit_scale: bool = False
    max_logit_scale: float = 100.0

    def check(self) -> None:
        check_prompts(self.prompts)
        if self.max_text_length < 1:
            raise ConfigError(f"model.max_text_length must be >= 1, got {self.max_text_length}")
        bad = sorted(set(self.trainable) - set(DEFAULT_TRAINABLE))
        if bad:
            raise ConfigError(f"model.trainable has unknown part(s) {bad}; the embedder's parts are "
                              f"{', '.join(DEFAULT_TRAINABLE)}")

    def modes(self) -> dict[str, str]:
        return {**DEFAULT_TRAINABLE, **self.trainable}


class TextPrompter:
    """``texts, langs -> {input_ids [B, L], attention_mask [B, L]}``: each text inside its language's text
    prompt, cut to ``max_text_length`` tokens, padded on ``padding_side``. Picklable (loader workers run it);
    it is the embedder's ``tokenizer``, so ``vlm eval``'s text encoder (``tokenizer(texts)``) gets it."""

    def __init__(self, tokenizer, config: EmbedderConfig):
        self.tok, self.prompts, self.default_lang = tokenizer, dict(config.prompts), config.default_lang
        self.lang_prompts, self.side, self.max_len = config.lang_prompts, config.padding_side, config.max_text_length
        self._cache: dict[str, dict] = {}

    def fields(self, lang: str | None) -> dict[str, str]:
        code = lang if (lang and self.lang_prompts) else self.default_lang
        if code not in self._cache:
            self._cache[code] = resolve_prompts(code, self.prompts)
        return self._cache[code]

    def _cut(self, text: str) -> str:
        text = text.replace(IMAGE_TOKEN, "<image >")  # a text never holds image placeholders
        if len(text) <= self.max_len:  # a token is at least one character
            return text
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_len else self.tok.decode(ids[: self.max_len])

    def __call__(self, texts: Sequence[str], langs: Sequence[str | None] | str | None = None) -> dict:
        from vlm.vision_llm.tokenize import _pad

        texts = list(texts)
        langs = [langs] * len(texts) if langs is None or isinstance(langs, str) else list(langs)
        if len(langs) != len(texts):
            raise ValueError(f"got {len(langs)} languages for {len(texts)} texts")
        rows = [self.tok(text_prompt(self.fields(lg), self._cut(t)))["input_ids"] for t, lg in zip(texts, langs)]
        return _pad(rows, self.tok.pad_token_id, self.side)


class Embedder(nn.Module):
    """A :class:`~vlm.vision_llm.VisionLLM` whose final hidden state at the last prompt token is the
    embedding of an image or a text (see the package docstring). ``encode_image`` / ``encode_text`` /
    ``tokenizer`` / ``image_preprocess`` as on :class:`vlm.model.DualEncoder`."""

    def __init__(self, config: EmbedderConfig, vlm: VisionLLM):
        super().__init__()
        config.check()
        self.config, self.vlm = config, vlm
        self.tokenizer = TextPrompter(vlm.llm.tokenizer, config)
        self.image_preprocess = vlm.image_preprocess
        self.embed_dim = int(vlm.llm.hidden_size)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)),
                                        requires_grad=config.learn_logit_scale)
        self.logit_bias = None if config.init_logit_bias is None else nn.Parameter(
            torch.tensor(float(config.init_logit_bias)), requires_grad=config.learn_logit_scale)
        self._image_ids: dict[str, torch.Tensor] = {}

    @property
    def lang_aware_text(self) -> bool:
        """Whether a text's prompts follow its language (``lang_prompts``): then ``vlm eval``'s text encoder
        (:func:`vlm.eval.zeroshot.make_text_encoder`) tokenizes each language's texts with that language."""
        return bool(self.config.lang_prompts)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EmbedderConfig, *, trust_remote_code: bool = False) -> "Embedder":
        """Build for training: from ``config.vision_llm`` (its weights, adapters adapted to ``trainable``)
        or from the specs in ``config.base``."""
        from vlm.embedder.saving import adapt_vision_llm

        config.check()
        if config.vision_llm:
            vlm = VisionLLM.from_pretrained(config.vision_llm, trust_remote_code=trust_remote_code)
            adapt_vision_llm(vlm, config)
        else:
            base = dataclasses.replace(config.base, trainable={**config.base.trainable, **config.modes()},
                                       lora=config.lora, prompt_tuning=config.prompt_tuning)
            vlm = VisionLLM(base)
        return cls(config, vlm)

    @classmethod
    def from_vision_llm(cls, path, config: EmbedderConfig | None = None, *, trainable: bool = False,
                        trust_remote_code: bool = False) -> "Embedder":
        """A vision-LLM directory as an embedder with ``config``'s prompts, no training needed
        (``trainable=True``: adapted to ``config.trainable`` for tuning, as :meth:`from_config`)."""
        config = dataclasses.replace(config or EmbedderConfig(), vision_llm=str(path))
        if trainable:
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        model = cls(config, VisionLLM.from_pretrained(path, trust_remote_code=trust_remote_code))
        return model.requires_grad_(False).eval()

    def save_pretrained(self, path):
        """``config.json`` (format ``vlm.embedder/1``), ``embedder.safetensors`` (temperature, bias) and the
        vision-LLM under ``vision_llm/`` (``VisionLLM.save_pretrained``: adapters in peft's format)."""
        from vlm.embedder.saving import save_embedder

        return save_embedder(self, path)

    @classmethod
    def from_pretrained(cls, path, *, trainable: bool = False, device=None,
                        trust_remote_code: bool = False) -> "Embedder":
        """Load a :meth:`save_pretrained` directory (``vlm.model.load_model`` does this for ``vlm eval``)."""
        from vlm.embedder.saving import load_embedder

        return load_embedder(cls, path, trainable=trainable, device=device, trust_remote_code=trust_remote_code)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        base = self.vlm.llm.base_model
        base.gradient_checkpointing_enable() if enable else base.gradient_checkpointing_disable()

    # -- pooling ---------------------------------------------------------------------------------------
    def last_token_states(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds [B, L, H]``, ``attention_mask [B, L]`` (left or right padded) -> the LLM's final
        hidden state at the last non-pad token ``[B, H]``. Causal LMs get explicit position ids (so padding
        shifts no position; a soft prompt is prepended here as peft's forward would, since peft drops
        position ids); seq2seq LMs: the encoder reads the sequence (right-aligned: T5's relative positions go
        by index), the decoder's first state (after its start token) is the one that would predict the
        summary word."""
        llm = self.vlm.llm
        model = llm.model
        if llm.is_encoder_decoder:  # relative positions go by index: move the padding to the right
            order = (1 - mask.long()).argsort(dim=1, stable=True)
            embeds = embeds.gather(1, order.to(embeds.device)[..., None].expand_as(embeds))
            mask = mask.gather(1, order)
        if is_prompt_learning(model):
            embeds, mask = prepend_soft_prompt(model, embeds, mask)
            model = model.get_base_model()
        mask = mask.to(embeds.device)
        if llm.is_encoder_decoder:
            start = model.config.decoder_start_token_id
            if start is None:
                raise UserError(f"the seq2seq LLM {llm.source} has no decoder_start_token_id in its config")
            dec = torch.full((embeds.shape[0], 1), int(start), dtype=torch.long, device=embeds.device)
            out = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True)
            return out.decoder_hidden_states[-1][:, -1]
        inner = getattr(model, model.base_model_prefix, None)
        inner = inner if isinstance(inner, nn.Module) else None
        target = inner or model
        kw = {}
        if "position_ids" in inspect.signature(target.forward).parameters:
            kw["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0)
        if inner is not None:
            h = inner(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state
        else:
            h = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, **kw).hidden_states[-1]
        last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]

    # -- encoders --------------------------------------------------------------------------------------
    def image_ids(self, lang: str | None = None) -> torch.Tensor:
        """The image sequence's ids ``[L]`` (placeholders expanded) in ``lang`` (default ``default_lang``)."""
        code = lang or self.config.default_lang
        if code not in self._image_ids:
            fields = resolve_prompts(code, self.config.prompts)
            enc = self.vlm.prompt_builder([image_prompt(fields, IMAGE_TOKEN)], None, None)
            self._image_ids[code] = enc["input_ids"][0]
        return self._image_ids[code]

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True, *, lang: str | None = None,
                     aux: dict | None = None) -> torch.Tensor:
        """``pixels`` uint8 or normalised float ``[B, 3, S, S]`` -> ``[B, H]`` (unit rows if ``normalize``).
        ``aux`` receives the tower's and projector's aux entries."""
        ids = self.image_ids(lang).to(pixels.device).unsqueeze(0).expand(pixels.shape[0], -1)
        mask = torch.ones_like(ids)
        embeds, part_aux = self.vlm.embed_inputs(pixels, ids, mask)
        if aux is not None:
            aux.update(part_aux)
        x = self.last_token_states(embeds, mask).float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids, attention_mask: torch.Tensor | None = None, normalize: bool = True, *,
                    lang: str | Sequence[str] | None = None) -> torch.Tensor:
        """``input_ids [B, L]`` + ``attention_mask`` from ``self.tokenizer`` (the prompted texts), or a list of
        B strings (prompted here, in ``lang``) -> ``[B, H]`` (unit rows if ``normalize``)."""
        if isinstance(input_ids, (list, tuple)):
            enc = self.tokenizer(list(input_ids), lang)
            dev = self.logit_scale.device
            input_ids, attention_mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.last_token_states(self.vlm.llm.embed(input_ids), attention_mask).float()
        return F.normalize(x, dim=-1) if normalize else x

    # -- training forward ------------------------------------------------------------------------------
    def forward(self, batch: dict, lm_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """``batch`` (:class:`~vlm.embedder.collate.EmbedCollate`'s): ``pixels [B,3,S,S]``, ``input_ids`` /
        ``attention_mask [T, L]`` (prompted texts; T = B, or more with ``text_to_image``), and with
        ``lm_weight > 0`` ``lm`` (the vision-LLM's caption batch) -> ``image_features [B, H]``,
        ``text_features [T, H]`` (unit rows), ``logit_scale`` (exp'd, clamped), ``logit_bias``, the parts'
        aux entries, and ``lm_loss`` = ``lm_weight`` x the image-conditioned next-token loss (``lm/loss``
        unweighted) when ``lm_weight > 0``."""
        aux: dict[str, torch.Tensor] = {}
        dev = batch["pixels"].device
        img = self.encode_image(batch["pixels"], aux=aux)
        txt = self.encode_text(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        out = {"image_features": img, "text_features": txt,
               "logit_scale": self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp(),
               "logit_bias": self.logit_bias, **aux}
        if lm_weight > 0:
            if "lm" not in batch:
                raise UserError("lm_weight > 0 needs the caption batch 'lm' (EmbedCollate with lm=True)")
            lm = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch["lm"].items()}
            lm_out = self.vlm({**lm, "pixels": batch["pixels"]})
            out["lm_loss"] = lm_weight * lm_out["lm_loss"]
            out["lm/loss"] = lm_out["lm_loss"].detach()
        return out
