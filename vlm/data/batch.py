"""The one batch contract every collate step produces and every model/task consumes.

Images travel as **uint8** ``[B, 3, H, W]`` from the loader workers and are normalised inside the model
step with the tower's own mean/std (see ``vlm.towers.base.ImagePreprocess.normalize``): a uint8 batch is
4x smaller than float32 to move between processes, which measured 29-45 % more samples/s (FINDINGS.md).
"""
from __future__ import annotations

from typing import TypedDict

import torch


class Batch(TypedDict, total=False):
    """One batch. Only the keys a task needs are present; shapes use B = batch, L = text length.

    pixels:          uint8  [B, 3, H, W]  RGB, already resized/cropped to the tower's image size
    input_ids:       int64  [B, L]        token ids from the text side's tokenizer (padded)
    attention_mask:  int64  [B, L]        1 = real token, 0 = padding
    labels:          int64  [B, L]        LM targets, -100 where no loss (prompt, image, padding)
    text:            list[str] (B)        the rendered text (contrastive: templated caption; caption/vqa: target)
    lang:            list[str] (B)        language code of the text (lower-case ISO 639, e.g. "de", "zh")
    key:             list[str] (B)        the sample's ``__key__`` in its shard (unique per shard set)
    url:             list[str] (B)        the shard the sample came from
    class_id:        int64  [B]           class index, -1 where the sample has none
    prompt:          list[str] (B)        instruction (only from a model's own collate; never the data layer's)
    target:          list[str] (B)        answer/caption part (caption / vqa tasks)
    question:        list[str] (B)        the VQA question in ``lang`` (vqa task)
    qa:              list[dict] (B)       {lang: (question, answers)} of every language (vqa task)
    captions:        list[dict] (B)       {lang: [captions]} of every language (caption / image tasks)
    answers:         list[list[str]] (B)  all reference answers/captions (evaluation)
    text_to_image:   int64  [T]           only with data.captions_per_image = k > 1: the image row of each
                                          text; then text/input_ids/attention_mask have T = B*k rows
    text_lang:       list[str] (T)        language of each text (with text_to_image)
    skipped:         dict[str, int]       cumulative skipped-sample counts by reason, of the worker that
                                          made this batch (aggregate with ``vlm.data.wds.SkipStats``)
    worker:          str                  "rank{r}/worker{w}" of the producing worker
    """

    pixels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    text: list
    lang: list
    key: list
    url: list
    class_id: torch.Tensor
    prompt: list
    target: list
    question: list
    qa: list
    captions: list
    answers: list
    text_to_image: torch.Tensor
    text_lang: list
    skipped: dict
    worker: str


IGNORE_INDEX = -100
