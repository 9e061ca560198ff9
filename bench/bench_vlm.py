"""Benchmark: our VisionLLM against transformers' Blip2ForConditionalGeneration at the same tiny BLIP-2 size.

    python bench/bench_vlm.py                       # default: ~1-2 minutes on 2 cores
    python bench/bench_vlm.py --hidden 256 --layers 4 --new-tokens 64 --repeats 5

One ``Blip2ForConditionalGeneration`` is built from a tiny ``Blip2Config`` (ViT: hidden ``--hidden``,
``--layers`` layers, 32 px, patch 8 -> 17 tokens; Q-Former: hidden ``--hidden``, ``--queries`` queries;
OPT decoder of the same width; the vocabulary of our tiny byte-level tokenizer, with ``<image>`` as BLIP-2's
``image_token_index``). Ours is assembled from *the same weights*: the BLIP-2 vision model as the tower (a
thin wrapper giving ``[B, N, D]`` tokens), our ``QFormerProjector`` filled by ``load_hf_state_dict`` from the
BLIP-2 state dict, and a copy of its OPT as the LLM. The script first checks both give the same logits
(max abs diff printed), then times, in the same process and alternating the two so machine noise hits both:

* generation, greedy with KV cache, batch 1 and 8, the same prompt, exactly ``--new-tokens`` new tokens
  (``min_new_tokens`` = ``max_new_tokens``): tokens/s = batch x new tokens / time. Both run transformers'
  ``generate`` loop on the LLM; ours runs it under ``torch.inference_mode`` (no autograd bookkeeping per
  op), transformers' own under ``torch.no_grad``, which is where our gain comes from: a last line times
  Blip2 wrapped in ``inference_mode`` by hand, for comparison;
* a training step (forward + backward + AdamW; vision tower frozen, Q-Former + projection + LLM trained)
  at batch ``--batch`` on the same prompt + caption batch.

Output: one line per measurement with ours, theirs and the ratio ours/theirs (>1 = we are faster; for
time per step the ratio is theirs/ours). The median of ``--repeats`` timings is used. The machine may be
shared: numbers are noisy, compare within one run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn


class HFVisionTower(nn.Module):
    """A transformers BLIP-2 vision model as a tower: ``forward(pixels [B,3,S,S] float) -> [B, N, D]``."""

    def __init__(self, vision_model: nn.Module, image_size: int):
        super().__init__()
        from vlm.towers.base import ImagePreprocess

        self.vision = vision_model
        cfg = vision_model.config
        self.width = cfg.hidden_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.preprocess = ImagePreprocess(image_size=image_size, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels).last_hidden_state


def build_pair(hidden: int, layers: int, queries: int, seed: int = 0):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    from vlm.llms.hf import IMAGE_TOKEN, LanguageModel
    from vlm.llms.tiny import BOS_ID, EOS_ID, PAD_ID, build_tiny_tokenizer
    from vlm.projectors.qformer import build_qformer
    from vlm.vision_llm import VisionLLM, VisionLLMConfig

    tok = build_tiny_tokenizer(["en", "de"])
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    heads = max(1, hidden // 16)
    text = OPTConfig(vocab_size=len(tok) + (-len(tok)) % 8, hidden_size=hidden, num_hidden_layers=layers,
                     ffn_dim=4 * hidden, num_attention_heads=heads, word_embed_proj_dim=hidden,
                     max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = Blip2Config(vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, image_size=32, patch_size=8),
                      qformer_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=4 * hidden, encoder_hidden_size=hidden,
                                          cross_attention_frequency=1),
                      text_config=text.to_dict(), num_query_tokens=queries, image_token_index=image_id)
    torch.manual_seed(seed)
    theirs = Blip2ForConditionalGeneration(cfg).eval()
    tower = HFVisionTower(copy.deepcopy(theirs.vision_model), 32)
    proj = build_qformer(f"q{queries}-l{layers}-h{hidden}-a{heads}-x1-i{4 * hidden}", in_dim=hidden, out_dim=hidden)
    proj.load_hf_state_dict(theirs.state_dict())
    llm = LanguageModel(copy.deepcopy(theirs.language_model), tok, source="blip2-opt copy")
    ours = VisionLLM(VisionLLMConfig(trainable={"tower": "frozen", "projector": "full", "llm": "full"}),
                     tower=tower, projector=proj, llm=llm).eval()
    return theirs, ours


def inputs(ours, batch: int, with_targets: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    prompts = ["A short image caption in English:"] * batch
    targets = ["a red circle on a blue background"] * batch if with_targets else None
    enc = ours.prompt_builder(prompts, targets, ["en"] * batch, padding_side="right" if with_targets else "left")
    return pixels, enc


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


@torch.no_grad()
def check_parity(theirs, ours) -> float:
    pixels, enc = inputs(ours, 2, True)
    a = theirs(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    embeds, _ = ours.embed_inputs(pixels, enc["input_ids"], enc["attention_mask"])
    b = ours.llm.model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    return float((a - b).abs().max())


def bench_generate(theirs, ours, batch: int, new_tokens: int, repeats: int,
                   theirs_inference_mode: bool = False) -> tuple[float, float]:
    pixels, enc = inputs(ours, batch, False)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True)
    # transformers' generate runs under torch.no_grad (its own decorator); ours under torch.inference_mode
    grad_off = torch.inference_mode if theirs_inference_mode else torch.no_grad

    def run_theirs():
        with grad_off():
            theirs.generate(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            **kw)

    @torch.no_grad()
    def run_ours():
        ours.generate(pixels, prompts=["A short image caption in English:"] * batch, lang="en", **kw)

    t_o, t_t = [], []
    for _ in range(2):  # alternate so machine noise hits both
        t_o.append(_median_time(run_ours, repeats))
        t_t.append(_median_time(run_theirs, repeats))
    n = batch * new_tokens
    return n / min(t_o), n / min(t_t)


def bench_train(theirs, ours, batch: int, repeats: int) -> tuple[float, float]:
    pixels, enc = inputs(ours, batch, True)
    theirs.train()
    ours.train()
    theirs.vision_model.requires_grad_(False)
    theirs.vision_model.eval()
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)  # as theirs
    batch_o = {"pixels": pixels, **enc}

    def step_theirs():
        out = theirs(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     labels=enc["labels"])
        out.loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)

    def step_ours():
        out = ours(batch_o)
        out["lm_loss"].backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)

    t_o, t_t = [], []
    for _ in range(2):
        t_o.append(_median_time(step_ours, repeats))
        t_t.append(_median_time(step_theirs, repeats))
    return min(t_o), min(t_t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=32, help="width of ViT, Q-Former and OPT (default 32)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=8, help="Q-Former query tokens (default 8)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    theirs, ours = build_pair(args.hidden, args.layers, args.queries)
    print(f"tiny BLIP-2: hidden {args.hidden}, {args.layers} layers, {args.queries} queries, OPT decoder; "
          f"torch threads {args.threads}")
    print(f"parity: max |logits ours - transformers| = {check_parity(theirs, ours):.2e}")
    for b in (1, 8):
        o, t = bench_generate(theirs, ours, b, args.new_tokens, args.repeats)
        print(f"generate batch {b}, {args.new_tokens} new tokens (greedy, KV cache): ours {o:8.1f} tok/s  "
              f"transformers Blip2 {t:8.1f} tok/s  ratio {o / t:.2f}x")
    o, t = bench_generate(theirs, ours, 8, args.new_tokens, args.repeats, theirs_inference_mode=True)
    print(f"  (where the gain comes from: Blip2.generate wrapped by hand in torch.inference_mode, batch 8: "
          f"{t:8.1f} tok/s, ours/that {o / t:.2f}x)")
    o, t = bench_train(theirs, ours, args.batch, args.repeats)
    print(f"train step batch {args.batch} (fwd+bwd+AdamW): ours {o * 1000:8.1f} ms  transformers Blip2 "
          f"{t * 1000:8.1f} ms  ratio {t / o:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
