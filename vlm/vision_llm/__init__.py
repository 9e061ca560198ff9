"""The vision-LLM package: image tower -> projector -> LLM, joined by image placeholder tokens (LLaVA / mBLIP / PaliGemma).

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

Which parts train is configuration, in the one vocabulary of :mod:`vlm.trainable`: ``trainable = {tower:
frozen|full, projector: frozen|full, llm: frozen|full|lora|prompt|lora+prompt}`` (defaults frozen, full,
lora), plus ``unlocked_groups``, ``freeze_bn_stats`` and ``frozen`` patterns; LoRA (injected into the LLM's
layers) and the soft prompt (a peft wrapper around it) go through peft (``vlm.adapters``), with their
settings in ``lora`` and ``prompt_tuning``. Per-part learning rates are the optimizer's (``optim.part_lr``
over module paths: ``tower``, ``projector``, ``llm``).

Saving (``save_pretrained(dir)``): ``config.json``, ``projector.safetensors``, ``tower.safetensors`` (unless
the tower is frozen and ``save_frozen_tower`` is off), each LLM adapter in peft's own format under
``adapter/llm/<mode>/`` (``lora``, ``prompt``; a user loads a single one with ``PeftModel.from_pretrained``),
and/or the full LLM under ``llm/`` (trained in full, or LoRA merged). Frozen parts are rebuilt from their
spec; a fingerprint (evenly spaced weight values) saved in ``config.json`` catches a spec that no longer
gives the weights the model was trained with.

Files: ``model.py`` (:class:`VisionLLM`, :class:`VisionLLMConfig`), ``prompts.py`` (instruction templates,
the one place a prompt is decided), ``tokenize.py`` (:class:`PromptBuilder`), ``loss.py``
(:func:`token_loss`), ``saving.py`` (the directory format).
"""
from vlm.vision_llm.loss import token_loss
from vlm.vision_llm.model import VisionLLM, VisionLLMConfig
from vlm.vision_llm.prompts import CAPTION_TEMPLATES, VQA_TEMPLATES, make_prompt
from vlm.vision_llm.saving import FORMAT, fingerprint
from vlm.vision_llm.tokenize import PromptBuilder

__all__ = ["VisionLLM", "VisionLLMConfig", "PromptBuilder", "make_prompt", "token_loss", "fingerprint", "FORMAT",
           "CAPTION_TEMPLATES", "VQA_TEMPLATES"]
