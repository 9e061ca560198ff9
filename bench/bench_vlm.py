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

With ``--plot-dir``, ``vlm.png``: batch-1 generation time and allocator peak against 4..32 new tokens, both sides.

Output: one line per measurement with ours, theirs and the ratio ours/theirs (>1 = we are faster; for
time per step the ratio is theirs/ours). The median of ``--repeats`` timings is used. The machine may be
shared: numbers are noisy, compare within one run.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from torch import nn

from common import Report, add_protocol_args, interleave, ratio_row, timed, traced_peak_mib  # noqa: E402

BENCH_PROTOCOL = 1


class HFVisionTower(nn.Module):
    """A transformers BLIP-2 vision model as a tower: ``forward(pixels [B,3,S,S] float) -> ([B, N, D], {})``
    (the tower interface: tokens and an aux dict)."""

    def __init__(self, vision_model: nn.Module, image_size: int):
        super().__init__()
        from vlm.towers.base import ImagePreprocess

        self.vision = vision_model
        cfg = vision_model.config
        self.width = cfg.hidden_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.preprocess = ImagePreprocess(image_size=image_size, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.vision(pixel_values=pixels).last_hidden_state, {}


def build_pair(hidden: int, layers: int, queries: int, seed: int = 0, llm: str = "opt"):
    """``llm`` "opt": an OPT decoder of width ``hidden``; "smollm2-135m": a random-init Llama of SmolLM2-135M's
    shape (hidden 576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152; 135M parameters)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, LlamaConfig, OPTConfig

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
    if llm == "smollm2-135m":
        text = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                           tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = Blip2Config(vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, image_size=32, patch_size=8),
                      qformer_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=4 * hidden, encoder_hidden_size=hidden,
                                          cross_attention_frequency=1),
                      text_config=text.to_dict(), num_query_tokens=queries, image_token_index=image_id)
    torch.manual_seed(seed)
    theirs = Blip2ForConditionalGeneration(cfg).eval()
    tower = HFVisionTower(copy.deepcopy(theirs.vision_model), 32)
    proj = build_qformer(f"q{queries}-l{layers}-h{hidden}-a{heads}-x1-i{4 * hidden}", in_dim=hidden, out_dim=text.hidden_size)
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


@torch.no_grad()
def check_parity(theirs, ours) -> float:
    pixels, enc = inputs(ours, 2, True)
    a = theirs(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    embeds, _ = ours.embed_inputs(pixels, enc["input_ids"], enc["attention_mask"])
    b = ours.llm.model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits
    return float((a - b).abs().max())


def generate_fns(theirs, ours, batch: int, new_tokens: int, theirs_inference_mode: bool = False):
    """-> (run_ours, run_theirs): each one greedy ``generate`` of exactly ``new_tokens`` tokens per prompt."""
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

    return run_ours, run_theirs


def bench_generate(theirs, ours, batch: int, new_tokens: int, rounds: int,
                   theirs_inference_mode: bool = False) -> tuple[list[float], list[float]]:
    """-> per-round seconds (ours, theirs), ABBA-interleaved after one warm-up each."""
    run_ours, run_theirs = generate_fns(theirs, ours, batch, new_tokens, theirs_inference_mode)
    res = interleave({"ours": timed(run_ours), "theirs": timed(run_theirs)}, rounds, warmup=1)
    return res["ours"], res["theirs"]


def plot_generate(rep, args, theirs, ours, sizes=(4, 8, 16, 32)) -> None:
    """``vlm.png``: batch-1 generation time (median of ``--rounds``, the "equal" setting: both under
    ``inference_mode``) and the allocator peak of one call, against the number of new tokens."""
    series = {"vlm VisionLLM": ([], [], []), "transformers Blip2": ([], [], [])}
    for n in sizes:
        o, t = bench_generate(theirs, ours, 1, n, args.rounds, theirs_inference_mode=True)
        for name, secs, fn in zip(series, (o, t), generate_fns(theirs, ours, 1, n, theirs_inference_mode=True)):
            series[name][0].append(n)
            series[name][1].append(statistics.median(secs))
            series[name][2].append(traced_peak_mib(fn))
    rep.plot(args.plot_dir, "vlm.png", f"greedy generate, batch 1, width {args.hidden}, "
             "both inference_mode (peak: torch CPU allocator)", "new tokens", series)


def bench_train(theirs, ours, batch: int, rounds: int) -> tuple[list[float], list[float]]:
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

    res = interleave({"ours": timed(step_ours), "theirs": timed(step_theirs)}, rounds, warmup=1)
    theirs.eval()
    ours.eval()
    return res["ours"], res["theirs"]


def run_size(rep, args, llm: str, label: str, batches=(1, 8), train=True) -> tuple:
    """The rows of one LLM size; -> its (theirs, ours) pair."""
    theirs, ours = build_pair(args.hidden, args.layers, args.queries, llm=llm)
    n_llm = sum(p.numel() for p in theirs.language_model.parameters())
    print(f"{label}: LLM {llm} ({n_llm / 1e6:.1f}M params); parity: max |logits ours - transformers| = "
          f"{check_parity(theirs, ours):.2e}", flush=True)
    tv = rep.env["versions"]["transformers"]
    for b in batches:
        n = b * args.new_tokens
        for setting, im in (("equal", True), ("defaults", False)):
            o, t = bench_generate(theirs, ours, b, args.new_tokens, args.rounds, theirs_inference_mode=im)
            rep.add(ratio_row("vlm", f"generate {label}, batch {b}, {args.new_tokens} new tokens",
                              [n / x for x in o], [n / x for x in t], unit="tok/s", higher_is_better=True,
                              setting=setting, peer_name="transformers Blip2", peer_version=tv,
                              note="both inference_mode" if im else "Blip2 under its own no_grad"))
    if train:
        o, t = bench_train(theirs, ours, args.batch, args.rounds)
        rep.add(ratio_row("vlm", f"train step {label}, batch {args.batch}", o, t, unit="s", higher_is_better=False,
                          peer_name="transformers Blip2", peer_version=tv, note="fwd+bwd+AdamW"))
    return theirs, ours


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=32, help="width of ViT, Q-Former and OPT (default 32)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--queries", type=int, default=8, help="Q-Former query tokens (default 8)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ABBA) per row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    ap.add_argument("--no-135m", action="store_true", help="skip the SmolLM2-135M-shaped LLM size")
    add_protocol_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 3, 16
    torch.set_num_threads(args.threads)
    rep = Report(__file__, "transformers")
    print(f"tiny BLIP-2 parts: hidden {args.hidden}, {args.layers} layers, {args.queries} queries; torch threads "
          f"{args.threads}", flush=True)
    pair = run_size(rep, args, "opt", f"width {args.hidden}")
    if args.plot_dir:
        plot_generate(rep, args, *pair)
    if not args.no_135m:
        run_size(rep, args, "smollm2-135m", "135M LLM", batches=(1,) if args.quick else (1, 8), train=not args.quick)
    rep.finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
