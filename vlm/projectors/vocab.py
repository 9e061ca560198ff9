"""The ``vocab`` projector: visual tokens as probability-weighted word embeddings of class names.

A two-layer MLP whose hidden layer is a classifier over ``V`` named classes (softmax activation) and whose
output layer is a table of ``V`` rows of the LLM's width (Ovis's probabilistic visual tokens: a visual head
gives a distribution over a visual vocabulary, the token is the expected row of an embedding table)::

    tokens [B, N, D] --mean over N--> [B, D] --head--> logits [B, V] --softmax(/T)--> p --p @ table--> [B, 1, H]

What makes it worth having is its initialisation (:meth:`VocabProjector.init_from_parts`, which
:class:`~vlm.vision_llm.VisionLLM` calls once the tower and the LLM exist): the head is copied from the
tower's own classifier (a timm tower built with ``num_classes=1000`` keeps its ImageNet head), and row ``v``
of the table is the mean of the LLM's input embeddings of the tokens of `` <name of class v>``. At step 0
the LLM therefore reads an image of a zebra as (nearly) the word "zebra". Fine-tuning only has to teach it
to describe what it reads, which carries over to concepts absent from the fine-tuning data; an MLP started
from random weights must learn the whole mapping from image features to words from the fine-tuning
captions, and on a few hundred images it fits them without carrying over to new concepts (measured in
``vlm demo --real``, README). Both layers stay trainable.

Options (``projector_cfg``):

    labels        ``imagenet`` (timm's bundled ImageNet-1k synsets, first lemma of each: "goldfish"), a text
                  file with one class name per line, or a list of names. V = len(labels).
    tokens        ``pooled`` (one token, the distribution of the mean token: what the classifier was trained
                  on for a CNN with global average pooling), ``each`` (one distribution per tower token:
                  where things are) or ``both`` (pooled first, then each).
    temperature   softmax temperature (1.0: the classifier's own probabilities).
    init          ``parts`` (head from the tower, table from the LLM; an error when the tower has no head
                  of V classes) or ``random`` (normal(0, 0.02) head, a normal table at the scale of the
                  LLM's embeddings).

``ln_vision`` is not offered: the tower's classifier expects the tower's features as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from vlm.projectors.mlp import _check_tokens, freeze_parameters
from vlm.registry import SpecError, register

TOKENS = ("pooled", "each", "both")


def resolve_labels(labels: str | Sequence[str]) -> list[str]:
    """``imagenet`` | a file (one name per line) | a list of names -> the class names (non-empty)."""
    if isinstance(labels, str):
        if labels == "imagenet":
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            names = [info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes())]
        else:
            path = Path(labels).expanduser()
            if not path.is_file():
                raise SpecError(f"vocab projector: labels={labels!r} is neither 'imagenet' nor an existing text "
                                "file with one class name per line")
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        names = [str(x).strip() for x in labels]
    if not names or any(not n for n in names):
        raise SpecError(f"vocab projector: labels must be non-empty class names, got {len(names)} names "
                        f"({sum(not n for n in names)} empty)")
    return names


class VocabProjector(nn.Module):
    """Probability-weighted class-name embeddings (module docstring). ``forward(tokens [B, N, in_dim]) ->
    ([B, M, out_dim], {"proj/class_probs": [B, M, V]})``, M = 1, N or 1 + N by ``tokens``."""

    def __init__(self, in_dim: int, out_dim: int, labels: str | Sequence[str] = "imagenet", tokens: str = "pooled",
                 temperature: float = 1.0, init: str = "parts"):
        super().__init__()
        if tokens not in TOKENS:
            raise SpecError(f"vocab projector: tokens={tokens!r}; choose one of {list(TOKENS)}")
        if not temperature > 0:
            raise SpecError(f"vocab projector: temperature must be > 0, got {temperature!r}")
        if init not in ("parts", "random"):
            raise SpecError(f"vocab projector: init={init!r}; choose 'parts' (head from the tower, table from "
                            "the LLM) or 'random'")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.labels = resolve_labels(labels)
        self.tokens, self.temperature, self.init = tokens, float(temperature), init
        self.head = nn.Linear(self.in_dim, len(self.labels))
        self.table = nn.Parameter(torch.empty(len(self.labels), self.out_dim))
        nn.init.normal_(self.table, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def num_output_tokens(self, n: int) -> int:
        return {"pooled": 1, "each": n, "both": 1 + n}[self.tokens]

    @torch.no_grad()
    def init_from_parts(self, tower: nn.Module, llm) -> None:
        """Head <- the tower's classifier, table <- the LLM's embeddings of the class names (``init=parts``);
        ``init=random`` keeps random weights, the table drawn at the scale of the LLM's embeddings."""
        if self.init == "random":
            emb = llm.embed(torch.arange(min(4096, len(llm.tokenizer)), device=self.table.device)[None])[0]
            nn.init.normal_(self.table, std=float(emb.float().std()))
            return
        head = _classifier(tower)
        if head is None or tuple(head.weight.shape) != tuple(self.head.weight.shape):
            got = "none" if head is None else f"{head.out_features} classes of width {head.in_features}"
            raise SpecError(f"vocab projector: init=parts copies the tower's classifier ({len(self.labels)} classes "
                            f"of width {self.in_dim}), the tower has {got}; build the tower with its head "
                            "(tower_cfg.num_classes=1000 for timm ImageNet weights) or set projector_cfg.init=random")
        self.head.weight.copy_(head.weight)
        if head.bias is not None:
            self.head.bias.copy_(head.bias)
        tok = llm.tokenizer
        for v, name in enumerate(self.labels):
            ids = tok(" " + name, add_special_tokens=False)["input_ids"] or tok(name, add_special_tokens=False)[
                "input_ids"]
            rows = llm.embed(torch.tensor([ids], device=self.table.device))[0]
            self.table[v] = rows.float().mean(0)

    def forward(self, image_tokens: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict]:
        """image_tokens [B, N, in_dim] -> ([B, M, out_dim], {"proj/class_probs": [B, M, V]})."""
        _check_tokens(image_tokens, self.in_dim, type(self).__name__)
        parts = []
        if self.tokens in ("pooled", "both"):
            parts.append(image_tokens.mean(1, keepdim=True))
        if self.tokens in ("each", "both"):
            parts.append(image_tokens)
        x = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        probs = (self.head(x) / self.temperature).softmax(-1)
        return probs @ self.table.to(probs.dtype), {"proj/class_probs": probs.detach()}


def _classifier(tower: nn.Module) -> nn.Linear | None:
    """The tower's classification head when it has one (timm ``get_classifier``), else None."""
    trunk = getattr(tower, "trunk", tower)
    get = getattr(trunk, "get_classifier", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


@register("projector", "vocab", help="class-name vocabulary: softmax over the tower's classifier times the LLM's "
                                     "embeddings of the class names (Ovis-style; init from tower head + LLM)")
def _vocab(in_dim: int, out_dim: int, frozen: Iterable[str] = (), **cfg) -> VocabProjector:
    proj = VocabProjector(in_dim, out_dim, **cfg)
    if frozen:
        freeze_parameters(proj, frozen)
    return proj
