"""Vision-LLMs as embedders (VladVA; Gen2Embed's "From Generator to Embedder").

One vision-LLM (tower -> projector -> LLM, :mod:`vlm.vision_llm`) gives both embeddings::

    image:  [system] <image> x M [image instruction + query suffix]  -> LLM -> final hidden state, last token
    text:   [system] text [text instruction + query suffix]          -> the same LLM, no image
    both L2-normalised; width = the LLM's hidden size

so it is used exactly as a dual encoder: ``encode_image(pixels)``, ``encode_text(input_ids, attention_mask)``
(or ``encode_text(list_of_str, lang=)``), ``tokenizer(texts) -> {input_ids, attention_mask}`` (the prompted
texts), ``image_preprocess``; ``vlm.model.load_model(dir)`` loads an embedder directory, so ``vlm eval
zeroshot`` / ``retrieval`` / ``compare`` run on it unchanged (and on a plain vision-LLM directory, read as
an embedder with the built-in prompts).

Design:

- **Prompts** (:mod:`vlm.embedder.prompts`): five fields per language (system, image instruction and suffix,
  text instruction and suffix), ``"*"`` and built-in fallbacks. ``lang_prompts`` says whether a text uses its
  own language's prompts or always ``default_lang``'s (what ``vlm eval``, passing no language, gets).
- **Pooling** (:meth:`Embedder.last_token_states`): the hidden state at the last non-pad token under left or
  right padding (position ids from the mask, so the padding side changes nothing); a soft prompt is
  prepended as peft does it (peft drops explicit position ids). Causal LMs: the LLM's final (normed) hidden
  state; seq2seq LMs: the encoder reads the sequence and the decoder's first state is taken.
- **What trains** is the vision-LLM's own vocabulary (:mod:`vlm.trainable`), VladVA's default
  ``{tower: frozen, projector: frozen, llm: lora+prompt}``. From a directory (a ``vlm train`` finetune
  output), :func:`~vlm.embedder.saving.adapt_vision_llm` keeps its LoRA training and adds a soft prompt.
- **Temperature**: ``logit_scale`` (Gen2Embed's tau = 0.02, fixed unless ``learn_logit_scale``) and an
  optional SigLIP bias; :meth:`Embedder.forward` returns the dual encoder's output dict, so the project's
  losses (InfoNCE, SigLIP, decoupled) and GradCache take it unchanged, plus ``lm_loss`` (lambda x the
  vision-LLM's own image-conditioned next-token loss).
- **Saving**: ``save_pretrained(dir)`` = ``config.json`` + ``embedder.safetensors`` + the vision-LLM in its
  own format under ``vision_llm/`` (:mod:`vlm.embedder.saving`).
- **Hard negatives** (:mod:`vlm.embedder.mining`): clusters of a query and its K hardest non-duplicate
  owners, mined with the model's own embeddings; :mod:`vlm.data.clusters` serves them as batches.

Files: ``prompts.py``, ``model.py`` (:class:`EmbedderConfig`, :class:`Embedder`, :class:`TextPrompter`),
``saving.py``, ``collate.py`` (the loader-side batch builder), ``mining.py``.
"""
from vlm.embedder.model import DEFAULT_TRAINABLE, Embedder, EmbedderConfig, TextPrompter
from vlm.embedder.saving import FORMAT, is_embedder_dir

__all__ = ["Embedder", "EmbedderConfig", "TextPrompter", "DEFAULT_TRAINABLE", "FORMAT", "is_embedder_dir"]
