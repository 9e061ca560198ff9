"""The vision-LLM module and its config: tower -> projector -> LLM (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlm import registry
from vlm import trainable as tr
from vlm.adapters.lora import LoraAdapter, merge_lora
from vlm.adapters.soft_prompt import PromptTuningAdapter, is_prompt_learning, prepend_soft_prompt
from vlm.config import ConfigError
from vlm.data.batch import IGNORE_INDEX
from vlm.errors import UserError
from vlm.llms.base import IMAGE_TOKEN, LanguageModel
from vlm.towers.base import check_aux
from vlm.vision_llm.loss import token_loss
from vlm.vision_llm.prompts import make_prompt
from vlm.vision_llm.tokenize import PromptBuilder

# The parts of ``trainable`` (vlm.trainable): tower frozen|full|lora, projector frozen|full, llm frozen|full|
# lora|prompt|lora+prompt. One ``lora`` section serves every part in mode lora (target_modules None: each
# part's family defaults).
PARTS = (tr.Part("tower", ("tower",), default="frozen", target="module"),
         tr.Part("projector", ("projector",), default="full"),
         tr.Part("llm", ("llm.model",), default="lora", target="llm"))


@dataclass
class VisionLLMConfig(tr.TrainableConfig):
    """A vision-LLM: three specs with their options, which parts train (``trainable`` / ``unlocked_groups``
    / ``freeze_bn_stats`` / ``frozen`` from :class:`~vlm.trainable.TrainableConfig`), adapters and prompts."""

    tower: str = "tiny:vit"
    tower_cfg: dict[str, Any] = field(default_factory=dict)
    projector: str = "mlp2x_gelu"
    projector_cfg: dict[str, Any] = field(default_factory=dict)
    llm: str = "tiny:llama"
    llm_cfg: dict[str, Any] = field(default_factory=dict)
    num_image_tokens: int | None = None
    """None: what the projector makes of the tower's tokens; a number is checked against that."""
    lora: LoraAdapter = field(default_factory=LoraAdapter)  # for llm in mode lora / lora+prompt
    prompt_tuning: PromptTuningAdapter = field(default_factory=PromptTuningAdapter)  # mode prompt
    lang_control: Literal["token", "instruction", "both"] = "instruction"
    default_lang: str = "en"
    prompts: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Instructions per task and language, ``{caption: {lang: [templates]}, vqa: {...}}`` (``"*"``: any other
    language; VQA templates hold ``{question}``), replacing the built-in table of that task. Training draws one
    template per sample, generation takes the first: the one place a prompt is decided
    (:mod:`vlm.vision_llm.prompts`)."""
    max_target_length: int = 64
    save_frozen_tower: bool = True
    """Save a frozen tower's weights too. Needed when its spec builds random weights (``tiny:vit``); set
    False for a large pretrained tower that its spec rebuilds (a fingerprint check guards the rebuild)."""

    def check(self) -> None:
        from vlm.vision_llm.prompts import check_prompts

        check_prompts(self.prompts)
        tr.resolve(PARTS, self)  # parts and modes of trainable / unlocked_groups (ConfigError)

    def mode(self, part: str) -> str:
        """The mode of ``part`` as configured (defaults filled in): ``"frozen"``, ``"lora+prompt"``, ..."""
        return "+".join(tr.resolve(PARTS, self)[part])



def build_projector(config: VisionLLMConfig, tower: nn.Module, llm: LanguageModel, *, init: bool = True) -> nn.Module:
    """The projector ``config`` names, for ``tower`` and ``llm``. ``init``: a projector that starts from the
    tower's and the LLM's weights (``init_from_parts``, e.g. ``vocab``) gets them; a saved model's loader
    passes False, since the saved weights replace them."""
    projector = registry.build("projector", config.projector, in_dim=tower.width, out_dim=llm.hidden_size,
                               **config.projector_cfg)
    if init and hasattr(projector, "init_from_parts"):
        projector.init_from_parts(tower=tower, llm=llm)
    return projector


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
            projector = build_projector(config, self.tower, self.llm)
        self.projector = projector
        m = projector.num_output_tokens(self.tower.num_tokens) if hasattr(projector, "num_output_tokens") else None
        if config.num_image_tokens is not None and m is not None and m != config.num_image_tokens:
            raise ConfigError(f"num_image_tokens={config.num_image_tokens} but projector {config.projector} makes {m} "
                              f"tokens from the tower's {self.tower.num_tokens}; drop num_image_tokens or fix it")
        self.num_image_tokens = int(m if m is not None else config.num_image_tokens or self.tower.num_tokens)
        self.image_preprocess = self.tower.preprocess
        self.prompt_builder = PromptBuilder(self.llm.tokenizer, self.num_image_tokens, self.llm.is_encoder_decoder,
                                            config.lang_control, config.max_target_length)
        self.modes = tr.apply(self, PARTS, config)  # part -> mode words; LLM adapters are in place now
        self._llm_state = "adapter" if self.llm_adapters() else "base"  # base | adapter | merged
        self.train(self.training)

    # -- which parts train -----------------------------------------------------------------------------
    def llm_adapters(self) -> list:
        """The adapters the LLM's mode names (from the registry), in the order they were applied."""
        return tr.adapters_for(self.modes["llm"], self.config)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # parts with nothing to train stay in eval mode (no dropout, fixed norms)
            tr.keep_frozen_in_eval(self, PARTS)
        return self

    # -- inputs ----------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict:
        """Add ``input_ids``, ``attention_mask``, ``labels`` (with image placeholders) for this LLM.

        From text when the batch has ``target`` (list[str], the caption/answer): ``prompt`` (list[str], the
        full instruction; default: the caption template of each ``lang``) and ``lang`` go through
        :class:`PromptBuilder`; ids a data collate made from the same strings are replaced, since they carry
        no placeholders and a decoder-only layout. Without ``target``, ``input_ids``/``labels`` must come
        from this model's ``prompt_builder`` already. A batch prepared once is returned unchanged."""
        from vlm.vision_llm.collate import PREPARED

        if batch.get(PREPARED):
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
        return {**batch, **enc, PREPARED: True}

    def num_target_tokens(self, batch: dict) -> int:
        """Target tokens ``forward`` averages over (prepare the batch once and reuse it)."""
        labels = self.prepare_batch(batch)["labels"]
        return int((labels[:, 1:] if not self.llm.is_encoder_decoder else labels).ne(IGNORE_INDEX).sum())

    def encode_images(self, pixels: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict]:
        """``pixels`` uint8 or normalised float ``[B, 3, S, S]`` -> (visual ``[B, M, H]``, aux): the tower's
        aux entries (``img/...``) and the projector's (``proj/...``); ``ctx`` goes to the projector."""
        if pixels.dtype == torch.uint8:
            pixels = self.image_preprocess.normalize(pixels)
        with torch.set_grad_enabled(torch.is_grad_enabled() and tr.trains(self.tower)):  # full or lora
            tokens, tower_aux = self.tower(pixels)
        visual, proj_aux = self.projector(tokens, **ctx)
        return visual, {**check_aux(tower_aux, "img/", f"tower {self.config.tower}"),
                        **check_aux(proj_aux, "proj/", f"projector {self.config.projector}")}

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
        """-> (``inputs_embeds [B, L, H]`` with image rows filled, the tower's and projector's aux)."""
        text_embeds = self.llm.embed(input_ids)
        text_mask = attention_mask.bool() & (input_ids != self.llm.image_token_id)
        if labels is not None and not self.llm.is_encoder_decoder:
            text_mask &= labels == IGNORE_INDEX  # prompt tokens only (Parrot's router input)
        visual, aux = self.encode_images(pixels, text_embeds=text_embeds, text_mask=text_mask)
        return self.join(input_ids, text_embeds, visual), aux

    def make_prompt(self, task: str, lang: str, question: str | None = None) -> str:
        """:func:`make_prompt` with this model's ``lang_control`` and templates (training = generation)."""
        return make_prompt(task, lang, question, self.config.lang_control, self.config.prompts.get(task))

    def collate(self, task: str, *, seed: int = 0, image_blind: bool = False):
        """The picklable batch builder a data loader runs in its workers for ``task`` (caption | vqa):
        prompts from this model's ``prompts`` and tokens from its ``prompt_builder``."""
        from vlm.vision_llm.collate import VisionLLMCollate

        return VisionLLMCollate(self.prompt_builder, task, self.config.prompts.get(task),
                                lang_control=self.config.lang_control, seed=seed, image_blind=image_blind)

    # -- training forward ------------------------------------------------------------------------------
    def forward(self, batch: dict, num_items_in_batch: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``batch``: pixels ``[B,3,S,S]`` + (``target``/``prompt``/``lang``) or (``input_ids``,
        ``attention_mask``, ``labels``) -> ``{"lm_loss", "img/...", "proj/...", "lm/loss_sum", "lm/n_tokens"}``
        (the tower's and projector's ``*_loss`` aux entries are loss terms next to ``lm_loss``).
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
        """Fold LoRA into the LLM weights for inference (a plain transformers model; a soft prompt, with
        ``lora+prompt``, stays around it). The LLM's mode drops ``lora``."""
        if "lora" not in self.modes["llm"]:
            raise UserError("merge_lora needs an LLM carrying a LoRA adapter (trainable.llm=lora or lora+prompt)")
        merge_lora(self.llm.model)
        rest = tuple(w for w in self.modes["llm"] if w != "lora") or ("frozen",)
        self.modes = {**self.modes, "llm": rest}
        tr.mark_adapters_trainable(self.llm.model, self.llm_adapters())
        self._llm_state = "merged"
        return self


    # -- save / load -----------------------------------------------------------------------------------
    def save_pretrained(self, path) -> Path:
        """Write ``config.json``, ``projector.safetensors``, ``tower.safetensors`` (unless frozen and not
        ``save_frozen_tower``) and the LLM: ``adapter/llm/<mode>/`` per adapter (peft format) and/or ``llm/``
        (full weights: trained in full, or LoRA merged). Parts not saved get a fingerprint, checked when
        :meth:`from_pretrained` rebuilds them. Returns the directory."""
        from vlm.vision_llm.saving import save_vision_llm

        return save_vision_llm(self, path)

    @classmethod
    def from_pretrained(cls, path, *, dtype: str | None = None, trainable: bool = False,
                        device: str | torch.device | None = None, trust_remote_code: bool = False) -> "VisionLLM":
        """Load a directory written by :meth:`save_pretrained`. ``trainable=False`` (inference): every
        parameter frozen and the model in eval mode; ``True``: the saved ``trainable`` settings apply.
        ``trust_remote_code``: let the LLM's / towers' directories run their own code (the caller's
        decision only; a value in the saved config is ignored, see :mod:`vlm.vision_llm.saving`)."""
        from vlm.vision_llm.saving import load_vision_llm

        return load_vision_llm(cls, path, dtype=dtype, trainable=trainable, device=device,
                               trust_remote_code=trust_remote_code)
