"""Text-to-image through the vision-LLM: the LLM writes DualToken image codes after a prompt in any language.

Model (:class:`TextToImage`): a :class:`~vlm.vision_llm.VisionLLM` whose tower is a frozen image tokenizer
(``dualtoken:...`` or a saved tokenizer, :mod:`vlm.towers.dualtoken`), plus :class:`~vlm.vision_llm.t2i_heads.
DualHeads` (a semantic and a pixel depth transformer), a learned begin-of-image vector ``boi [H]`` and
learned image-position embeddings ``image_pos [N, H]``. Sequence (causal LLM, prompts left-padded so the
N image positions are the last N of every row)::

    [pad.. <s> prompt tokens (<2xx>)] [boi]  [x_0]  [x_1] ... [x_{N-2}]       LLM input
                                       h_0    h_1    h_2  ...  h_{N-1}         LLM last hidden states
    x_t = code_proj([sum_d e^pix_{c_{t,d}} ; sum_d e^sem_{c_{t,d}}]) + image_pos[t+1];  boi + image_pos[0] first
    h_t -> DualHeads -> the D residual codes of position t (semantic first, then pixel given them)

The LLM input at an image position is the sum of the code embeddings of the previous position (each
branch's codebook vectors summed over depth: the quantised latent the tokenizer rebuilds from the codes),
both branches concatenated and mapped to the LLM width by ``code_proj`` (a 2-layer MLP like the
understanding projector), as in RQ-Transformer. The alternative, the tokenizer's ``features_from_codes``
through the understanding projector, was tried and rejected: those features are not a function of one
position's codes -- the semantic path runs the backbone's remaining attention blocks over the whole grid and
the pixel path an attention block (:mod:`vlm.towers.dualtoken`) -- so in generation position t's input
would depend on positions not generated yet, and teacher forcing would leak future codes into the past.
Understanding (captioning through the tower's ``forward`` and the projector) is unchanged; generation does
not use the projector, so it stays frozen here (``trainable.projector`` must be ``frozen``).

Training (:meth:`TextToImage.forward`, recipe ``train/t2i.py``): codes come from the frozen tokenizer on the
fly (``encode`` under no_grad), teacher forcing, loss = mean cross-entropy over positions and depths per
branch (``t2i_semantic_loss`` + ``t2i_pixel_loss``). Classifier-free guidance: with probability
``cond_dropout`` a training row's prompt is replaced by the unconditional one (``<s>`` only), drawn from
the training RNG (checkpointed, so a resumed run drops the same rows). Generation (:meth:`generate_codes`,
:meth:`generate`): the LLM runs with a KV cache (``use_cache=True``: one new position per step) or
without (the whole sequence again each step; same codes under greedy decoding, tested), the heads draw
codes with :class:`~vlm.vision_llm.t2i_heads.Sampling` (temperature, top-k, top-p, seed, guidance scale:
guided logits = cond + scale (cond - uncond), the unconditional rows run in the same batch), and the
tokenizer decodes the pixel codes.

Prompts (:class:`T2IPrompter`, picklable, used by the loader collate and by generation alike): template
``t2i_prompts[lang]`` (else ``t2i_prompts["*"]``, else ``"{caption}"``: the text itself) filled with the
caption, plus the ``<2xx>`` language token when ``lang_control`` is ``token``/``both`` and the tokenizer
has it. Saved as a vision-LLM directory (``VisionLLM.from_pretrained`` / ``vlm caption`` read it as is) plus
``t2i.json`` (the :class:`T2IConfig`) and ``t2i.safetensors`` (heads, ``code_proj``, ``boi``, ``image_pos``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ConfigError
from vlm.errors import UserError
from vlm.vision_llm.model import VisionLLM, VisionLLMConfig
from vlm.vision_llm.t2i_heads import BRANCHES, DualHeads, Sampling

T2I_FORMAT = "vlm.t2i/1"


@dataclass
class T2IConfig(VisionLLMConfig):
    """A :class:`VisionLLMConfig` (tower = the image tokenizer, frozen; projector; LLM) plus the code heads
    and the prompt / guidance settings of text-to-image (module docstring)."""

    tower: str = "dualtoken:tiny:vit"
    head_width: int = 128
    head_layers: int = 2
    head_heads: int = 4
    head_dropout: float = 0.0
    cond_dropout: float = 0.1
    """Share of training rows whose prompt is dropped (the unconditional model for guidance)."""
    t2i_prompts: dict[str, str] = field(default_factory=dict)
    """``{lang: "template with {caption}"}`` (``"*"``: any other language); default the caption itself."""
    unconditional: bool = False
    """Ignore every prompt (training and generation see only the unconditional one): the baseline model."""

    def __post_init__(self) -> None:  # unlike a captioner, the projector is unused here: frozen by default
        self.trainable = {"projector": "frozen", **dict(self.trainable or {})}

    def check(self) -> None:
        super().check()
        if self.mode("tower") != "frozen":
            raise ConfigError(f"trainable.tower={self.mode('tower')}: the image tokenizer must stay frozen for "
                              "text-to-image (its codes are the targets); set trainable.tower=frozen")
        if self.mode("projector") != "frozen":
            raise ConfigError(f"trainable.projector={self.mode('projector')}: text-to-image does not use the "
                              "understanding projector (its image inputs come from code_proj); set "
                              "trainable.projector=frozen")
        if "prompt" in self.mode("llm"):
            raise ConfigError(f"trainable.llm={self.mode('llm')}: text-to-image takes frozen, full or lora for "
                              "the LLM (a soft prompt is not supported here)")
        if not 0 <= self.cond_dropout < 1:
            raise ConfigError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        for k, v in (("head_width", self.head_width), ("head_layers", self.head_layers),
                     ("head_heads", self.head_heads)):
            if v < 1:
                raise ConfigError(f"model.{k} must be >= 1, got {v}")
        if self.head_width % self.head_heads:
            raise ConfigError(f"model.head_width={self.head_width} must be divisible by head_heads={self.head_heads}")
        for lang, t in self.t2i_prompts.items():
            if not isinstance(t, str) or "{caption}" not in t:
                raise ConfigError(f"model.t2i_prompts[{lang!r}] must be a string holding {{caption}}, got {t!r}")


def vision_llm_config(cfg: T2IConfig) -> VisionLLMConfig:
    """The plain :class:`VisionLLMConfig` part of ``cfg`` (what the saved ``config.json`` holds)."""
    return VisionLLMConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(VisionLLMConfig)})


class T2IPrompter:
    """Prompts -> left-padded ids (picklable, for loader workers). ``__call__(captions, langs) ->
    {"input_ids" [B, T], "attention_mask" [B, T], "uncond_ids" [B, T], "uncond_mask" [B, T]}`` (both padded
    to one length T, so a row can be swapped for its unconditional version in the model step)."""

    def __init__(self, tokenizer, templates: dict[str, str], lang_control: str):
        self.tokenizer, self.templates, self.lang_control = tokenizer, dict(templates), lang_control
        self.pad_id = tokenizer.pad_token_id

    def text(self, caption: str, lang: str) -> str:
        return (self.templates.get(lang) or self.templates.get("*") or "{caption}").format(caption=caption)

    def ids(self, caption: str, lang: str | None) -> list[int]:
        from vlm.llms.base import lang_token

        ids = list(self.tokenizer(self.text(caption, lang or ""))["input_ids"])
        if self.lang_control in ("token", "both") and lang:
            tid = self.tokenizer.convert_tokens_to_ids(lang_token(lang))
            if tid is not None and tid != self.tokenizer.unk_token_id:
                ids.append(int(tid))
        return ids

    def uncond(self) -> list[int]:
        return list(self.tokenizer("")["input_ids"]) or [self.pad_id]

    def __call__(self, captions: list[str], langs: list[str]) -> dict[str, torch.Tensor]:
        rows = [self.ids(c, lg) for c, lg in zip(captions, langs)]
        u = self.uncond()
        T = max(max(len(r) for r in rows), len(u))
        out = {}
        for name, rr in (("input_ids", rows), ("uncond_ids", [u] * len(rows))):
            ids = torch.full((len(rr), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rr), T), dtype=torch.long)
            for i, r in enumerate(rr):
                ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, T - len(r):] = 1
            out[name] = ids
            out["attention_mask" if name == "input_ids" else "uncond_mask"] = mask
        return out


class T2ICollate:
    """Loader collate of the ``caption`` data task for text-to-image: ``samples -> {"pixels" uint8
    [B,3,S,S], ids of :class:`T2IPrompter`, "lang", "key", "caption"}`` (picklable)."""

    def __init__(self, prompter: T2IPrompter):
        self.prompter = prompter

    def __call__(self, samples: list[dict]) -> dict:
        caps, langs = [s["target"] for s in samples], [s["lang"] for s in samples]
        return {"pixels": torch.stack([s["pixels"] for s in samples]), **self.prompter(caps, langs), "lang": langs,
                "key": [s["key"] for s in samples], "caption": caps}


def _depths(tok) -> dict[str, int]:
    d = getattr(tok, "depth", None)
    if isinstance(d, dict):
        return {b: int(d[b]) for b in BRANCHES}
    return {b: int(getattr(tok, f"{b}_depth", d)) for b in BRANCHES}


class TextToImage(nn.Module):
    """The vision-LLM with code heads (module docstring). ``vlm``: an existing :class:`VisionLLM` (loading)."""

    def __init__(self, config: T2IConfig, *, vlm: VisionLLM | None = None):
        super().__init__()
        config.check()
        self.config = config
        self.vlm = vlm if vlm is not None else VisionLLM(vision_llm_config(config))
        tok, llm = self.vlm.tower, self.vlm.llm
        missing = [a for a in ("encode", "decode", "features_from_codes", "codebook", "to_unit") if not hasattr(tok, a)]
        if missing:
            raise ConfigError(f"model.tower={config.tower} is not an image tokenizer (it has no {', '.join(missing)}); "
                              "use a dualtoken: tower (e.g. dualtoken:tiny:vit) or a saved tokenizer")
        if llm.is_encoder_decoder:
            raise ConfigError(f"model.llm={config.llm} is an encoder-decoder; text-to-image needs a causal LLM")
        self.num_tokens = int(tok.num_tokens)
        books = self.codebooks()
        H = llm.hidden_size
        self.heads = DualHeads(H, {b: int(books[b].shape[1]) for b in BRANCHES},
                               {b: int(books[b].shape[0]) for b in BRANCHES}, _depths(tok), width=config.head_width,
                               layers=config.head_layers, heads=config.head_heads, dropout=config.head_dropout)
        self.boi = nn.Parameter(torch.randn(H) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(self.num_tokens, H) * 0.02)
        code_in = sum(int(books[b].shape[1]) for b in BRANCHES)
        self.code_proj = nn.Sequential(nn.Linear(code_in, H), nn.GELU(), nn.Linear(H, H))
        self.prompter = T2IPrompter(llm.tokenizer, config.t2i_prompts, config.lang_control)
        out = llm.base_model.get_output_embeddings()  # never used here; frozen so DDP sees no unused parameter
        if out is not None and out.weight is not llm.base_model.get_input_embeddings().weight:
            out.requires_grad_(False)

    # -- parts -----------------------------------------------------------------------------------------
    @property
    def tokenizer_tower(self):
        return self.vlm.tower

    def codebooks(self) -> dict[str, torch.Tensor]:
        """``{branch: [K, C]}`` the tokenizer's codebooks (detached: the tokenizer is frozen)."""
        return {b: self.vlm.tower.codebook(b).detach() for b in BRANCHES}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vlm.train(mode)  # frozen parts back in eval mode
        return self

    # -- pieces ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def image_codes(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` uint8 or normalised ``[B,3,S,S]`` -> ``{"pixel": [B,N,Dp], "semantic": [B,N,Ds]}``."""
        if pixels.dtype == torch.uint8:
            pixels = self.vlm.image_preprocess.normalize(pixels)
        c = self.vlm.tower.encode(pixels)
        return {"pixel": c.pixel.long(), "semantic": c.semantic.long()}

    def code_inputs(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes ``{branch: [B, n, D]}`` -> LLM inputs ``[B, n, H]``: ``code_proj`` of both branches' summed
        code vectors (per position; no position embedding yet)."""
        books = self.codebooks()
        summed = [F.embedding(codes[b], books[b]).sum(-2) for b in ("pixel", "semantic")]  # [B, n, C] each
        w = self.code_proj[0].weight
        return self.code_proj(torch.cat(summed, -1).to(w.dtype))

    def _decoder(self):
        return self.vlm.llm.base_model.get_decoder()

    def _hidden(self, embeds, mask, *, cache=None, position_ids=None) -> tuple[torch.Tensor, object]:
        """The LLM's last hidden states ``[B, L, H]`` (no LM head) and the updated cache. Position ids
        count real tokens only (left padding), the same in training and generation; families without
        position ids (BLOOM's ALiBi) read the mask."""
        import inspect

        dec = self._decoder()
        kw = {}
        if "position_ids" in inspect.signature(dec.forward).parameters:
            kw["position_ids"] = position_ids if position_ids is not None else (mask.long().cumsum(1) - 1).clamp_min(0)
        out = dec(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=cache is not None, **kw)
        return out.last_hidden_state, out.cache

    # -- training --------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """``batch`` (:class:`T2ICollate`): pixels ``[B,3,S,S]``, ``input_ids``/``attention_mask`` and
        ``uncond_ids``/``uncond_mask`` ``[B, T]`` -> ``{"t2i_semantic_loss", "t2i_pixel_loss",
        "t2i/semantic_acc", "t2i/pixel_acc", "t2i/dropped"}`` (0-d tensors)."""
        dev = self.boi.device
        pixels = batch["pixels"].to(dev)
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        B = ids.shape[0]
        drop = torch.zeros(B, dtype=torch.bool, device=dev)
        if self.config.unconditional:
            ids, mask = batch["uncond_ids"].to(dev), batch["uncond_mask"].to(dev)
        elif self.training and self.config.cond_dropout > 0:
            drop = (torch.rand(B) < self.config.cond_dropout).to(dev)
            ids = torch.where(drop[:, None], batch["uncond_ids"].to(dev), ids)
            mask = torch.where(drop[:, None], batch["uncond_mask"].to(dev), mask)
        codes = self.image_codes(pixels)
        x = self.code_inputs(codes)
        N, H = self.num_tokens, x.shape[-1]
        img = torch.cat([self.boi.expand(B, 1, H).to(x.dtype), x[:, :-1]], 1) + self.image_pos.to(x.dtype)
        text = self.vlm.llm.embed(ids)
        embeds = torch.cat([text, img.to(text.dtype)], 1)
        full_mask = torch.cat([mask, torch.ones(B, N, dtype=mask.dtype, device=dev)], 1)
        h, _ = self._hidden(embeds, full_mask)
        h = h[:, -N:].reshape(B * N, -1)
        losses = self.heads.loss(h, {b: codes[b].reshape(B * N, -1) for b in BRANCHES}, self.codebooks())
        return {"t2i_semantic_loss": losses["semantic"], "t2i_pixel_loss": losses["pixel"],
                "t2i/semantic_acc": losses["semantic_acc"], "t2i/pixel_acc": losses["pixel_acc"],
                "t2i/dropped": drop.float().mean()}

    def collate(self) -> T2ICollate:
        """The picklable batch builder for ``make_loader(task="caption", collate_fn=...)``."""
        return T2ICollate(self.prompter)

    # -- generation ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_codes(self, captions: list[str], langs: list[str] | str, *, sampling: Sampling | None = None,
                       use_cache: bool = True) -> dict[str, torch.Tensor]:
        """Codes for one image per caption: ``{"pixel": [B,N,Dp], "semantic": [B,N,Ds]}``. ``langs``: one
        code or one per caption; ``sampling``: temperature / top-k / top-p / guidance / generator;
        ``use_cache``: the LLM's KV cache (else the whole sequence is recomputed each position)."""
        from transformers import DynamicCache

        from vlm.data.langs import normalize_lang

        s = sampling or Sampling()
        s.check()
        B = len(captions)
        langs = [langs] * B if isinstance(langs, str) else list(langs)
        if len(langs) != B:
            raise UserError(f"got {len(langs)} languages for {B} prompts")
        langs = [normalize_lang(x) for x in langs]
        dev = self.boi.device
        enc = {k: v.to(dev) for k, v in self.prompter(list(captions), langs).items()}
        guided = s.guidance > 0 and not self.config.unconditional
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if self.config.unconditional:
            ids, mask = enc["uncond_ids"], enc["uncond_mask"]
        if guided:
            ids, mask = torch.cat([ids, enc["uncond_ids"]]), torch.cat([mask, enc["uncond_mask"]])
        R, N = ids.shape[0], self.num_tokens
        books = self.codebooks()
        embeds = self.vlm.llm.embed(ids)
        step = (self.boi + self.image_pos[0]).to(embeds.dtype).expand(R, 1, -1)
        embeds = torch.cat([embeds, step], 1)
        mask = torch.cat([mask, torch.ones(R, 1, dtype=mask.dtype, device=dev)], 1)
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache() if use_cache else None
        h, cache = self._hidden(embeds, mask, cache=cache, position_ids=pos)
        out = {b: [] for b in BRANCHES}
        for t in range(N):
            last = h[:, -1].float()
            c = self.heads.sample(last[:B], books, s, last[B:] if guided else None)
            for b in BRANCHES:
                out[b].append(c[b])
            if t == N - 1:
                break
            x = self.code_inputs({b: torch.cat([c[b]] * (2 if guided else 1))[:, None] for b in BRANCHES})
            x = (x + self.image_pos[t + 1].to(x.dtype)).to(embeds.dtype)
            mask = torch.cat([mask, torch.ones(R, 1, dtype=mask.dtype, device=dev)], 1)
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            if use_cache:
                h, cache = self._hidden(x, mask, cache=cache, position_ids=pos[:, -1:])
            else:
                embeds = torch.cat([embeds, x], 1)
                h, _ = self._hidden(embeds, mask, position_ids=pos)
        return {b: torch.stack(v, 1) for b, v in out.items()}

    @torch.inference_mode()
    def decode(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pixel codes -> images ``[B,3,S,S]`` in [0, 1] (the tokenizer's decoder, un-normalised)."""
        tok = self.vlm.tower
        return tok.to_unit(tok.decode(codes["pixel"])).clamp(0, 1)

    def generate(self, captions: list[str], langs: list[str] | str, *, sampling: Sampling | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Captions -> images ``[B,3,S,S]`` in [0, 1] (:meth:`generate_codes` then :meth:`decode`)."""
        return self.decode(self.generate_codes(captions, langs, sampling=sampling, use_cache=use_cache))

    # -- save / load -----------------------------------------------------------------------------------
    def save_pretrained(self, path) -> Path:
        """The vision-LLM directory plus ``t2i.json`` and ``t2i.safetensors`` (module docstring)."""
        from safetensors.torch import save_file

        from vlm.config import to_dict
        from vlm.fileio import respect_umask

        p = self.vlm.save_pretrained(path)
        state = {f"{part}.{k}": v.detach().contiguous() for part in ("heads", "code_proj")
                 for k, v in getattr(self, part).state_dict().items()}
        state.update(boi=self.boi.detach().contiguous(), image_pos=self.image_pos.detach().contiguous())
        save_file({k: v.cpu() for k, v in state.items()}, str(p / "t2i.safetensors"))
        tmp = p / "t2i.json.tmp"
        tmp.write_text(json.dumps({"format": T2I_FORMAT, "config": to_dict(self.config)}, indent=2,
                                  ensure_ascii=False), encoding="utf-8")
        tmp.replace(p / "t2i.json")
        respect_umask(p)
        return p

    @classmethod
    def from_pretrained(cls, path, *, device: str | torch.device | None = None, trainable: bool = False,
                        trust_remote_code: bool = False) -> "TextToImage":
        """Load a directory written by :meth:`save_pretrained` (frozen and in eval mode unless ``trainable``)."""
        from safetensors.torch import load_file

        from vlm.config import from_dict

        p = Path(path).expanduser()
        f = p / "t2i.json"
        if not f.is_file():
            hint = " (it is a vision-LLM without image heads: train it with task: t2i)" if (p / "config.json").is_file() \
                else ""
            raise UserError(f"{p} is not a text-to-image model (no t2i.json){hint}; pass a run_dir/final of "
                            "vlm train with task: t2i")
        meta = json.loads(f.read_text(encoding="utf-8"))
        if meta.get("format") != T2I_FORMAT:
            raise UserError(f"{f} has format {meta.get('format')!r}, expected {T2I_FORMAT!r}")
        cfg = from_dict(T2IConfig, meta["config"])
        vlm = VisionLLM.from_pretrained(p, trainable=trainable, trust_remote_code=trust_remote_code)
        model = cls(cfg, vlm=vlm)
        state = load_file(str(p / "t2i.safetensors"))
        for part in ("heads", "code_proj"):
            getattr(model, part).load_state_dict({k[len(part) + 1:]: v for k, v in state.items()
                                                  if k.startswith(part + ".")})
        with torch.no_grad():
            model.boi.copy_(state["boi"])
            model.image_pos.copy_(state["image_pos"])
        if not trainable:
            model.requires_grad_(False)
        model.train(trainable)
        return model.to(device) if device is not None else model


def save_png(images: torch.Tensor, path, *, scale: int = 1, nrow: int = 8) -> Path:
    """``images [B,3,S,S]`` in [0, 1] -> one PNG (a grid of ``nrow`` columns when B > 1, torchvision's
    ``make_grid``), enlarged ``scale`` times (nearest neighbour), written atomically. Returns the path."""
    import os

    from torchvision.utils import make_grid, save_image

    x = images.detach().float().cpu()
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    img = make_grid(x, nrow=max(1, nrow), padding=2, pad_value=1.0) if x.shape[0] > 1 else x[0]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.png")
    save_image(img, str(tmp))
    os.replace(tmp, p)
    return p
