"""The vision-LLM: image tower -> projector -> LLM, joined by image placeholder tokens (LLaVA / mBLIP / PaliGemma).

Data flow (B images, one per sample; N tower tokens of width D; M projector tokens of width H = LLM width)::

    pixels uint8 [B,3,S,S] --normalize--> tower --> [B,N,D] --projector--> visual [B,M,H] (+ aux losses)
    prompt text "<image>\\n<instruction><2de>" --PromptBuilder--> ids with M copies of <image>
    inputs_embeds = llm.embed(ids); the rows at <image> positions <- visual   (masked_scatter)

Causal LM: input = [prompt (image tokens inside) + target + eos], labels = -100 on prompt, image and padding
positions. Seq2seq LM (mT5/mT0): encoder input = prompt, decoder labels = target + eos (padding -100).

Loss and gradient accumulation: ``forward(batch)`` returns ``lm_loss = loss_sum / n_tokens`` (sum of token
cross-entropies over the target tokens of this micro-batch). Averaging per-micro-batch means over
accumulation steps weights a token by 1/len(its micro-batch); to weight every target token equally, count
the tokens of all micro-batches first (``num_target_tokens``; all-reduce the count over ranks and divide it
by the world size when DDP averages gradients) and pass it: ``forward(batch, num_items_in_batch=total)``
then returns ``loss_sum / total``, whose gradients add up over the micro-batches to those of the one big
batch (tested). ``lm/loss_sum`` and ``lm/n_tokens`` are in the output for logging.

Language control (``lang_control``): ``"token"`` appends the target-language token (``<2de>``, as in
multilingual NMT) to a language-neutral prompt; ``"instruction"`` writes the instruction in the target
language from a small template table (:data:`CAPTION_TEMPLATES`, :data:`VQA_TEMPLATES`, overridable per
language in the config, English fallback naming the language); ``"both"`` does both. Generation uses the
same templates as a training batch without ``prompt`` strings, so the two cannot drift apart.

Which parts train is configuration: ``trainable = {tower: frozen|full, projector: frozen|full,
llm: frozen|full|lora|prompt}``; LoRA and prompt tuning go through peft (``vlm.adapters``).
``param_groups(base_lr, weight_decay)`` gives one optimizer group per part (its own ``lr`` from
``config.lr``) with no decay on biases, norms, embeddings and soft prompts.

Saving (``save_pretrained(dir)``): ``config.json``, ``projector.safetensors``, ``tower.safetensors`` (unless
the tower is frozen and ``save_frozen_tower`` is off), the LLM adapter in peft's own format under ``adapter/``
(a user can load it with ``PeftModel.from_pretrained``), or the full LLM under ``llm/`` (trained in full, or LoRA merged). Frozen
parts are rebuilt from their spec; a fingerprint (sum and sum of squares of the weights) saved in
``config.json`` catches a spec that no longer gives the weights the model was trained with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlm import registry
from vlm.adapters.lora import LoraAdapter, merge_lora
from vlm.adapters.soft_prompt import PromptTuningAdapter, is_prompt_learning, prepend_soft_prompt
from vlm.config import ConfigError, from_dict, to_dict
from vlm.data.batch import IGNORE_INDEX
from vlm.errors import UserError
from vlm.llms.hf import IMAGE_TOKEN, LanguageModel, lang_token, load_hf_llm

FORMAT = "vlm.vision_llm/1"
_TRAINABLE = {"tower": ("frozen", "full"), "projector": ("frozen", "full"),
              "llm": ("frozen", "full", "lora", "prompt")}

CAPTION_TEMPLATES = {
    "en": "A short image caption in English:", "de": "Eine kurze Bildbeschreibung auf Deutsch:",
    "fr": "Une courte légende de l'image en français :", "es": "Una breve descripción de la imagen en español:",
    "it": "Una breve didascalia dell'immagine in italiano:", "pt": "Uma breve legenda da imagem em português:",
    "ru": "Краткое описание изображения на русском языке:", "zh": "用中文简短描述这张图片：",
    "ja": "この画像を日本語で短く説明してください：", "hi": "इस चित्र का हिंदी में संक्षिप्त विवरण:",
    "ar": "وصف قصير للصورة باللغة العربية:", "tr": "Resmin Türkçe kısa bir açıklaması:",
}
VQA_TEMPLATES = {
    "en": "Question: {question} Short answer in English:", "de": "Frage: {question} Kurze Antwort auf Deutsch:",
    "fr": "Question : {question} Réponse courte en français :",
    "es": "Pregunta: {question} Respuesta breve en español:",
    "it": "Domanda: {question} Risposta breve in italiano:", "pt": "Pergunta: {question} Resposta curta em português:",
    "ru": "Вопрос: {question} Краткий ответ на русском языке:", "zh": "问题：{question} 用中文简短回答：",
    "ja": "質問：{question} 日本語で短く答えてください：", "hi": "प्रश्न: {question} हिंदी में संक्षिप्त उत्तर:",
    "ar": "سؤال: {question} إجابة قصيرة باللغة العربية:", "tr": "Soru: {question} Türkçe kısa cevap:",
}
_NEUTRAL = {"caption": "A short image caption:", "vqa": "Question: {question} Short answer:"}
_FALLBACK = {"caption": "A short image caption in {lang_name}:", "vqa": "Question: {question} Short answer in {lang_name}:"}


def make_prompt(task: str, lang: str, question: str | None = None, lang_control: str = "instruction",
                templates: dict[str, str] | None = None) -> str:
    """Instruction text for ``task`` ("caption" | "vqa") in language ``lang`` (a code, normalised here).

    ``lang_control="token"`` gives the language-neutral English instruction (the ``<2xx>`` token is added
    at tokenisation). Otherwise the template of ``lang`` from ``templates`` (a table that replaces the
    built-in one when given; the key ``"*"`` is the fallback for any language, as in :mod:`vlm.data.prompts`),
    else the English one naming the language. Placeholders: ``{question}``, ``{lang_name}``, ``{lang}``."""
    from vlm.data.langs import lang_name, normalize_lang

    if task not in _NEUTRAL:
        raise UserError(f"unknown generation task {task!r}; choose caption or vqa")
    if task == "vqa" and not question:
        raise UserError("a VQA prompt needs a question (--question)")
    code = normalize_lang(lang)
    own = templates or {}
    if lang_control == "token":
        tmpl = _NEUTRAL[task]
    else:
        table = own or (CAPTION_TEMPLATES if task == "caption" else VQA_TEMPLATES)
        tmpl = table.get(code) or table.get("*") or _FALLBACK[task]
    try:
        return tmpl.format(question=question or "", lang_name=lang_name(code), lang=code)
    except (KeyError, IndexError) as e:
        raise UserError(f"prompt template {tmpl!r} has an unknown placeholder {e}; use {{question}}, "
                        "{lang_name} or {lang}") from None


class PromptBuilder:
    """Tokenises (prompt, target, lang) triples for the LLM; picklable, so loader workers can run it.

    ``__call__(prompts, targets=None, langs=None, padding_side=None) ->`` dict of LongTensors:
    ``input_ids [B, L]``, ``attention_mask [B, L]`` and, when targets are given, ``labels``
    (causal: ``[B, L]`` aligned with input_ids; seq2seq: ``[B, T]`` decoder targets). A prompt holds the
    image placeholder once (prepended if absent), expanded to ``num_image_tokens`` copies."""

    def __init__(self, tokenizer, num_image_tokens: int, is_encoder_decoder: bool, lang_control: str = "instruction",
                 max_target_length: int = 64):
        self.tokenizer, self.m, self.seq2seq = tokenizer, int(num_image_tokens), bool(is_encoder_decoder)
        self.lang_control, self.max_target_length = lang_control, int(max_target_length)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def prompt_text(self, prompt: str, lang: str | None) -> str:
        n = prompt.count(IMAGE_TOKEN)
        if n > 1:
            raise UserError(f"a prompt may hold the image placeholder {IMAGE_TOKEN} at most once, got {n}: {prompt!r}")
        text = prompt if n == 1 else f"{IMAGE_TOKEN}\n{prompt}"
        if self.lang_control in ("token", "both") and lang:
            from vlm.data.langs import normalize_lang

            tok = lang_token(normalize_lang(lang))
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise UserError(f"the LLM tokenizer has no language token {tok}; use lang_control=instruction or "
                                f"load the LLM with llm_cfg.add_tokens=['{tok}', ...]")
            text = text + tok
        return text

    def _prompt_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text)["input_ids"]
        pos = [i for i, t in enumerate(ids) if t == self.image_id]
        if len(pos) != 1:
            raise UserError(f"the tokenizer turned {IMAGE_TOKEN} into {len(pos)} placeholders in {text!r}")
        return ids[: pos[0]] + [self.image_id] * self.m + ids[pos[0] + 1:]

    def __call__(self, prompts: list[str], targets: list[str] | None = None, langs: list[str] | None = None,
                 padding_side: str | None = None) -> dict[str, torch.Tensor]:
        B = len(prompts)
        langs = list(langs) if langs is not None else [None] * B
        if targets is not None and len(targets) != B or len(langs) != B:
            raise ValueError(f"prompts, targets and langs must have the same length, got {B}, "
                             f"{len(targets) if targets is not None else '-'}, {len(langs)}")
        p_ids = [self._prompt_ids(self.prompt_text(p, lg)) for p, lg in zip(prompts, langs)]
        t_ids = None
        if targets is not None:
            enc = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
            t_ids = [t[: self.max_target_length - 1] + [self.eos_id] for t in enc]
        side = padding_side or "right"
        if self.seq2seq or t_ids is None:
            out = _pad(p_ids, self.pad_id, side)
            if t_ids is not None:
                out["labels"] = _pad(t_ids, IGNORE_INDEX, "right")["input_ids"]
            return out
        seqs = [p + t for p, t in zip(p_ids, t_ids)]
        labs = [[IGNORE_INDEX] * len(p) + t for p, t in zip(p_ids, t_ids)]
        out = _pad(seqs, self.pad_id, side)
        out["labels"] = _pad(labs, IGNORE_INDEX, side)["input_ids"]
        return out


def _pad(rows: list[list[int]], value: int, side: str) -> dict[str, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), value, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(L - len(r), L)
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def token_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of target-token cross-entropies and their count. ``logits [B, L, V]``, ``labels [B, L]``
    (-100 = no target); ``shift=True`` for causal LMs (position t predicts label t+1)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (labels != IGNORE_INDEX).sum()


@dataclass
class VisionLLMConfig:
    """A vision-LLM: three specs with their options, which parts train, adapters and prompts."""

    tower: str = "tiny:vit"
    tower_cfg: dict[str, Any] = field(default_factory=dict)
    projector: str = "mlp2x_gelu"
    projector_cfg: dict[str, Any] = field(default_factory=dict)
    llm: str = "tiny:llama"
    llm_cfg: dict[str, Any] = field(default_factory=dict)
    num_image_tokens: int | None = None
    """None: what the projector makes of the tower's tokens; a number is checked against that."""
    trainable: dict[str, str] = field(default_factory=lambda: {"tower": "frozen", "projector": "full", "llm": "lora"})
    lora: LoraAdapter = field(default_factory=LoraAdapter)
    prompt_tuning: PromptTuningAdapter = field(default_factory=PromptTuningAdapter)
    lr: dict[str, float] = field(default_factory=dict)
    """Per-part learning rates (tower, projector, llm); a missing part uses the optimizer's base lr."""
    lang_control: Literal["token", "instruction", "both"] = "instruction"
    default_lang: str = "en"
    caption_templates: dict[str, str] = field(default_factory=dict)
    """Per-language caption instructions replacing the built-in table; ``"*"``: any other language. Set them
    to the prompts the data stage trains with (e.g. ``{"*": "Caption the image in {lang_name}:"}``)."""
    vqa_templates: dict[str, str] = field(default_factory=dict)
    max_target_length: int = 64
    save_frozen_tower: bool = True
    """Save a frozen tower's weights too. Needed when its spec builds random weights (``tiny:vit``); set
    False for a large pretrained tower that its spec rebuilds (a fingerprint check guards the rebuild)."""

    def check(self) -> None:
        bad = [k for k in self.trainable if k not in _TRAINABLE]
        if bad:
            raise ConfigError(f"trainable has unknown part(s) {bad}; parts are {list(_TRAINABLE)}")
        for part, mode in self.trainable.items():
            if mode not in _TRAINABLE[part]:
                raise ConfigError(f"trainable.{part}={mode!r}; choose one of {list(_TRAINABLE[part])}")
        bad = [k for k in self.lr if k not in _TRAINABLE]
        if bad:
            raise ConfigError(f"lr has unknown part(s) {bad}; parts are {list(_TRAINABLE)}")

    def mode(self, part: str) -> str:
        return self.trainable.get(part, "full" if part == "projector" else "frozen")


def fingerprint(module: nn.Module, k: int = 8) -> dict[str, list[float]]:
    """Per weight tensor, ``k`` evenly spaced values (adapter parameters excluded, peft's wrapper names
    undone), to recognise the same weights after a rebuild, also in another dtype."""
    out = {}
    for name, p in module.named_parameters():
        if any(t in name for t in ("lora_", "prompt_encoder", "modules_to_save")):
            continue
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, steps=min(k, flat.numel())).long()
        out[name.replace(".base_layer", "").replace(".original_module", "")] = flat[idx].float().tolist()
    return out


class VisionLLM(nn.Module):
    """tower -> projector -> LLM. See the module docstring. Parts may be passed in (else built from config)."""

    def __init__(self, config: VisionLLMConfig, *, tower: nn.Module | None = None, projector: nn.Module | None = None,
                 llm: LanguageModel | None = None):
        super().__init__()
        config.check()
        self.config = config
        self.tower = tower if tower is not None else registry.build("tower", config.tower, **config.tower_cfg)
        self.llm = llm if llm is not None else registry.build("llm", config.llm, **config.llm_cfg)
        if projector is None:
            projector = registry.build("projector", config.projector, in_dim=self.tower.width,
                                       out_dim=self.llm.hidden_size, **config.projector_cfg)
        self.projector = projector
        m = projector.num_output_tokens(self.tower.num_tokens) if hasattr(projector, "num_output_tokens") else None
        if config.num_image_tokens is not None and m is not None and m != config.num_image_tokens:
            raise ConfigError(f"num_image_tokens={config.num_image_tokens} but projector {config.projector} makes {m} "
                              f"tokens from the tower's {self.tower.num_tokens}; drop num_image_tokens or fix it")
        self.num_image_tokens = int(m if m is not None else config.num_image_tokens or self.tower.num_tokens)
        self.image_preprocess = self.tower.preprocess
        self.prompt_builder = PromptBuilder(self.llm.tokenizer, self.num_image_tokens, self.llm.is_encoder_decoder,
                                            config.lang_control, config.max_target_length)
        self._llm_state = "base"  # base | adapter | merged
        self._apply_trainable()

    # -- which parts train -----------------------------------------------------------------------------
    def _apply_trainable(self) -> None:
        for part in ("tower", "projector"):
            getattr(self, part).requires_grad_(self.config.mode(part) == "full")
        mode = self.config.mode("llm")
        self.llm.model.requires_grad_(mode == "full")
        if mode in ("lora", "prompt") and self._llm_state == "base":
            adapter = self.config.lora if mode == "lora" else self.config.prompt_tuning
            self.llm.model = adapter.apply(self.llm.model)  # peft freezes the base weights
            self._llm_state = "adapter"
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for part in ("tower", "llm"):  # frozen parts stay in eval mode (no dropout, fixed norms)
            if self.config.mode(part) == "frozen":
                getattr(self, part).eval()
        return self

    def param_groups(self, base_lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: per part (``config.lr[part]`` or ``base_lr``), split into decay / no decay
        (biases, norms, embeddings, soft prompts and other 1-d tensors get no weight decay)."""
        groups = []
        for part in ("tower", "projector", "llm"):
            decay, no_decay = [], []
            for name, p in getattr(self, part).named_parameters():
                if not p.requires_grad:
                    continue
                low = name.lower()
                skip = p.ndim < 2 or any(k in low for k in ("norm", "bias", "embed", "prompt_encoder", "ln_"))
                (no_decay if skip else decay).append(p)
            lr = float(self.config.lr.get(part, base_lr))
            for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, "/no_decay")):
                if params:
                    groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": part + suffix})
        if not groups:
            raise UserError("no parameter trains: set trainable.projector=full or trainable.llm=lora/full/prompt")
        return groups

    # -- inputs ----------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Add ``input_ids``, ``attention_mask``, ``labels`` (with image placeholders) for this LLM.

        From text when the batch has ``target`` (list[str], the caption/answer): ``prompt`` (list[str], the
        full instruction; default: the caption template of each ``lang``) and ``lang`` go through
        :class:`PromptBuilder`; ids a data collate made from the same strings are replaced, since they carry
        no placeholders and a decoder-only layout. Without ``target``, ``input_ids``/``labels`` must come
        from this model's ``prompt_builder`` already. A batch prepared once is returned unchanged."""
        if batch.get("_prepared_for") == id(self.prompt_builder):
            return batch
        if "target" in batch:
            B = len(batch["target"])
            langs = list(batch.get("lang") or [self.config.default_lang] * B)
            prompts = batch.get("prompt") or [self.make_prompt("caption", lg) for lg in langs]
            enc = self.prompt_builder(list(prompts), list(batch["target"]), langs)
        elif "labels" in batch and "input_ids" in batch:
            enc = {}
        else:
            raise UserError("a vision-LLM training batch needs 'target' texts (or input_ids + labels made by "
                            "the model's prompt_builder)")
        return {**batch, **enc, "_prepared_for": id(self.prompt_builder)}

    def num_target_tokens(self, batch: dict) -> int:
        """Target tokens ``forward`` averages over (prepare the batch once and reuse it)."""
        labels = self.prepare_batch(batch)["labels"]
        return int((labels[:, 1:] if not self.llm.is_encoder_decoder else labels).ne(IGNORE_INDEX).sum())

    def encode_images(self, pixels: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict]:
        """``pixels`` uint8 or normalised float ``[B, 3, S, S]`` -> (visual ``[B, M, H]``, aux dict)."""
        if pixels.dtype == torch.uint8:
            pixels = self.image_preprocess.normalize(pixels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.mode("tower") == "full"):
            tokens = self.tower(pixels)
        visual, aux = self.projector(tokens, **ctx)
        return visual, {(k if k.startswith("proj/") else f"proj/{k}"): v for k, v in (aux or {}).items()}

    def join(self, input_ids: torch.Tensor, text_embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Scatter ``visual [B, M, H]`` into the rows of ``text_embeds [B, L, H]`` where ``input_ids [B, L]``
        holds the image placeholder; every sample must hold exactly M placeholders."""
        is_img = input_ids == self.llm.image_token_id
        counts = is_img.sum(1)
        if visual.shape[0] != input_ids.shape[0] or bool((counts != visual.shape[1]).any()):
            raise UserError(f"image placeholder count mismatch: the prompts hold {counts.tolist()} {IMAGE_TOKEN} "
                            f"tokens but the projector gave {visual.shape[1]} tokens for each of {visual.shape[0]} "
                            "images; tokenize with the model's prompt_builder (one placeholder, expanded)")
        return text_embeds.masked_scatter(is_img.unsqueeze(-1), visual.to(text_embeds.dtype))

    def embed_inputs(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """-> (``inputs_embeds [B, L, H]`` with image rows filled, projector aux)."""
        text_embeds = self.llm.embed(input_ids)
        text_mask = attention_mask.bool() & (input_ids != self.llm.image_token_id)
        if labels is not None and not self.llm.is_encoder_decoder:
            text_mask &= labels == IGNORE_INDEX  # prompt tokens only (Parrot's router input)
        visual, aux = self.encode_images(pixels, text_embeds=text_embeds, text_mask=text_mask)
        return self.join(input_ids, text_embeds, visual), aux

    def make_prompt(self, task: str, lang: str, question: str | None = None) -> str:
        """:func:`make_prompt` with this model's ``lang_control`` and templates (training = generation)."""
        tmpls = self.config.caption_templates if task == "caption" else self.config.vqa_templates
        return make_prompt(task, lang, question, self.config.lang_control, tmpls)

    # -- training forward ------------------------------------------------------------------------------
    def forward(self, batch: dict, num_items_in_batch: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``batch``: pixels ``[B,3,S,S]`` + (``target``/``prompt``/``lang``) or (``input_ids``,
        ``attention_mask``, ``labels``) -> ``{"lm_loss", "proj/...", "lm/loss_sum", "lm/n_tokens"}``.
        ``num_items_in_batch``: target tokens of all accumulated micro-batches (see the module docstring)."""
        b = self.prepare_batch(batch)
        dev = b["pixels"].device
        ids, mask, labels = (b[k].to(dev) for k in ("input_ids", "attention_mask", "labels"))
        embeds, aux = self.embed_inputs(b["pixels"], ids, mask, labels)
        if self.llm.is_encoder_decoder:
            dec_in = self.llm.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
            out = self.llm.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_in)
            loss_sum, n = token_loss(out.logits, labels, shift=False)
        else:
            out = self.llm.model(inputs_embeds=embeds, attention_mask=mask)
            logits = out.logits[:, -ids.shape[1]:]  # drop soft-prompt positions, if any
            loss_sum, n = token_loss(logits, labels, shift=True)
        denom = num_items_in_batch if num_items_in_batch is not None else n.clamp_min(1)
        return {"lm_loss": loss_sum / denom, **aux, "lm/loss_sum": loss_sum.detach(), "lm/n_tokens": n}

    # -- generation ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, pixels: torch.Tensor, prompts: list[str] | None = None, lang: str | list[str] | None = None,
                 *, task: str = "caption", questions: list[str] | None = None, max_new_tokens: int = 32,
                 num_beams: int = 1, do_sample: bool = False, top_p: float | None = None,
                 temperature: float | None = None, seed: int | None = None, use_cache: bool = True,
                 **generate_kwargs) -> list[str]:
        """Caption / answer ``pixels [B,3,S,S]`` in ``lang`` (one code or one per image) through
        transformers ``generate`` on ``inputs_embeds``: greedy, beam (``num_beams``), sampling (``do_sample``,
        ``top_p``, ``temperature``, ``seed``), KV cache (``use_cache``). ``prompts`` overrides the template
        (``task`` caption | vqa with ``questions``). Returns B strings."""
        from vlm.data.langs import normalize_lang

        B = pixels.shape[0]
        langs = [lang] * B if lang is None or isinstance(lang, str) else list(lang)
        langs = [normalize_lang(x or self.config.default_lang) for x in langs]
        if len(langs) != B:
            raise UserError(f"got {len(langs)} languages for {B} images")
        if prompts is None:
            qs = questions if questions is not None else [None] * B
            if len(qs) != B:
                raise UserError(f"got {len(qs)} questions for {B} images")
            prompts = [self.make_prompt(task, lg, q) for lg, q in zip(langs, qs)]
        enc = self.prompt_builder(list(prompts), None, langs,
                                  padding_side="right" if self.llm.is_encoder_decoder else "left")
        enc = {k: v.to(pixels.device) for k, v in enc.items()}
        embeds, _ = self.embed_inputs(pixels, enc["input_ids"], enc["attention_mask"])
        mask, model = enc["attention_mask"], self.llm.model
        if is_prompt_learning(model):  # peft's generate would drop our image rows; see soft_prompt.py
            embeds, mask = prepend_soft_prompt(model, embeds, mask)
            model = model.get_base_model()
        tok = self.llm.tokenizer
        kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                  do_sample=do_sample, use_cache=use_cache, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id)
        if do_sample:
            kw.update({k: v for k, v in (("top_p", top_p), ("temperature", temperature)) if v is not None})
        kw.update(generate_kwargs)
        with torch.random.fork_rng(devices=[] if pixels.device.type == "cpu" else [pixels.device]):
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(**kw)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # -- adapters --------------------------------------------------------------------------------------
    def merge_lora(self) -> "VisionLLM":
        """Fold LoRA into the LLM weights for inference (the LLM becomes a plain transformers model)."""
        if self._llm_state != "adapter" or self.config.mode("llm") != "lora":
            raise UserError("merge_lora needs an LLM carrying a LoRA adapter (trainable.llm=lora)")
        self.llm.model = merge_lora(self.llm.model)
        self.llm.model.requires_grad_(False)
        self._llm_state = "merged"
        return self

    # -- save / load -----------------------------------------------------------------------------------
    def save_pretrained(self, path) -> Path:
        """Write ``config.json``, ``projector.safetensors``, ``tower.safetensors`` (unless frozen and not
        ``save_frozen_tower``) and the LLM: ``adapter/`` (peft format) or ``llm/`` (full weights). Parts not
        saved get a fingerprint, checked when :meth:`from_pretrained` rebuilds them. Returns the directory."""
        from safetensors.torch import save_model

        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        cfg = to_dict(self.config)
        tower_saved = self.config.mode("tower") == "full" or self.config.save_frozen_tower
        llm_weights = None
        if self._llm_state == "adapter":
            self.llm.model.save_pretrained(p / "adapter")
        elif self._llm_state == "merged" or self.config.mode("llm") == "full":
            self.llm.save_pretrained(p / "llm")
            llm_weights = "llm"
            if self._llm_state == "merged":
                cfg["trainable"]["llm"] = "frozen"
        save_model(self.projector, str(p / "projector.safetensors"))
        if tower_saved:
            save_model(self.tower, str(p / "tower.safetensors"))
        meta = {"format": FORMAT, "config": cfg, "num_image_tokens": self.num_image_tokens,
                "llm_weights": llm_weights, "tower_saved": tower_saved,
                "fingerprints": {"tower": None if tower_saved else fingerprint(self.tower),
                                 "llm": None if llm_weights else fingerprint(self.llm.base_model)}}
        tmp = p / "config.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p / "config.json")
        return p

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, trainable: bool = False,
                        device: str | torch.device | None = None) -> "VisionLLM":
        """Load a directory written by :meth:`save_pretrained`. ``trainable=False`` (inference): every
        parameter frozen and the model in eval mode; ``True``: the saved ``trainable`` settings apply."""
        from safetensors.torch import load_model

        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"{p} is not a saved vision-LLM (no config.json); pass a directory written by "
                            "VisionLLM.save_pretrained or by vlm train")
        meta = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(f"{p}/config.json is not a vision-LLM config (format {meta.get('format')!r}, "
                            f"expected {FORMAT!r})")
        config = from_dict(VisionLLMConfig, meta["config"])
        llm_cfg = dict(config.llm_cfg, **({"dtype": dtype} if dtype else {}))
        if meta.get("llm_weights"):
            llm = load_hf_llm(p / meta["llm_weights"], **{k: v for k, v in llm_cfg.items() if k == "dtype"})
        else:
            llm = registry.build("llm", config.llm, **llm_cfg)
            _check_fingerprint("llm", config.llm, llm.base_model, meta["fingerprints"]["llm"])
        tower = registry.build("tower", config.tower, **config.tower_cfg)
        if meta.get("tower_saved"):
            load_model(tower, str(p / "tower.safetensors"))
        else:
            _check_fingerprint("tower", config.tower, tower, meta["fingerprints"]["tower"])
        mode = config.mode("llm")
        config.trainable = {**config.trainable, "llm": "frozen" if mode in ("lora", "prompt") else mode}
        model = cls(config, tower=tower, llm=llm)  # adapters are loaded below, not created fresh
        load_model(model.projector, str(p / "projector.safetensors"))
        if mode in ("lora", "prompt"):
            from peft import PeftModel

            if not (p / "adapter" / "adapter_config.json").is_file():
                raise UserError(f"{p} was trained with llm={mode} but has no adapter/adapter_config.json")
            model.llm.model = PeftModel.from_pretrained(model.llm.model, str(p / "adapter"), is_trainable=trainable)
            model.config.trainable["llm"] = mode
            model._llm_state = "adapter"
        if not trainable:
            model.requires_grad_(False)
        model.train(trainable)
        return model.to(device) if device is not None else model


def _check_fingerprint(part: str, spec: str, module: nn.Module, saved: dict[str, list[float]]) -> None:
    now = fingerprint(module)
    same = now.keys() == saved.keys() and all(
        len(a) == len(b) and all(abs(x - y) <= 1e-2 * abs(y) + 1e-3 for x, y in zip(a, b))
        for a, b in ((now[n], saved[n]) for n in now))
    if not same:
        fix = "save the model with save_frozen_tower=true" if part == "tower" else "give llm_cfg its original options"
        raise UserError(f"the {part} rebuilt from spec {spec!r} has other weights than the one this model was "
                        f"trained with (its fingerprint in config.json differs); point the spec at the original "
                        f"weights, or {fix}")
