"""Embedding throughput of the embedder (vlm.embedder) against the same LLM run through transformers directly.

    python bench/bench_embedder.py [--quick] [--json out.json] [--texts 128] [--images 64] [--repeats 5]

Both sides embed the same inputs with the same weights (a random-init Llama from ``tiny:llama`` at the
given size, a tiny ViT tower and an MLP projector) and agree on the result (checked before timing):

* texts: the embedder's ``encode_text`` on the prompted token batch vs transformers' way
  (``LlamaForCausalLM(input_ids, attention_mask, output_hidden_states=True).hidden_states[-1]``, then the last
  non-pad position per row, L2-normalised);
* images: ``encode_image`` vs the same ``inputs_embeds`` (image rows from the same tower and projector, timed
  on both sides) through ``LlamaForCausalLM(inputs_embeds=..., output_hidden_states=True)``.

Rounds are interleaved ABBA (``bench/common.py``, the protocol ``bench/run_all.py`` collects), each timed pass
covers all items in batches of 32 under ``torch.inference_mode``; each row is the median of the per-round
ratios ours / transformers of items/s (> 1 = faster) with its spread.
``--plot-dir DIR`` draws ``embedder.png``: text-embedding time and traced allocator peak against the number of texts.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import Report, add_protocol_args, growth_point, interleave, ratio_row  # noqa: E402

BENCH_PROTOCOL = 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=128)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the 2-core machine is shared)")
    add_protocol_args(ap)
    a = ap.parse_args(argv)
    if a.quick:
        a.repeats, a.texts, a.images = 3, 64, 32
    torch.set_num_threads(a.threads)
    from vlm.embedder import Embedder, EmbedderConfig
    from vlm.vision_llm import VisionLLMConfig

    torch.manual_seed(0)
    cfg = EmbedderConfig(base=VisionLLMConfig(tower="tiny:vit", llm="tiny:llama",
                                              llm_cfg={"hidden_size": a.hidden, "num_layers": a.layers,
                                                       "num_heads": 4}), trainable={"llm": "frozen"})
    emb = Embedder.from_config(cfg).eval()
    hf = emb.vlm.llm.base_model  # the transformers LlamaForCausalLM itself
    words = "red blue green circle square star heart arrow moon cloud small big drawing photo of the a".split()
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g))
             for n in torch.randint(2, 24, (a.texts,), generator=g)]
    enc = emb.tokenizer(texts)
    pixels = torch.randint(0, 255, (a.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    B = a.batch

    def ours_text(n: int = a.texts):
        ids, mask = enc["input_ids"][:n], enc["attention_mask"][:n]
        return torch.cat([emb.encode_text(ids[s:s + B], mask[s:s + B]) for s in range(0, n, B)])

    def hf_text(n: int = a.texts):
        outs = []
        for s in range(0, n, B):
            ids, mask = enc["input_ids"][s:min(s + B, n)], enc["attention_mask"][s:min(s + B, n)]
            h = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            last = mask.sum(1) - 1  # right padding
            outs.append(F.normalize(h[torch.arange(h.shape[0]), last].float(), dim=-1))
        return torch.cat(outs)

    ids1 = emb.image_ids()

    def ours_image():
        return torch.cat([emb.encode_image(pixels[s:s + B]) for s in range(0, a.images, B)])

    def hf_image():
        outs = []
        for s in range(0, a.images, B):
            px = pixels[s:s + B]
            ids = ids1.unsqueeze(0).expand(px.shape[0], -1)
            embeds, _ = emb.vlm.embed_inputs(px, ids, torch.ones_like(ids))
            h = hf(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
            outs.append(F.normalize(h[:, -1].float(), dim=-1))
        return torch.cat(outs)

    with torch.inference_mode():
        for name, (x, y) in {"texts": (ours_text, hf_text), "images": (ours_image, hf_image)}.items():
            diff = float((x() - y()).abs().max())
            assert diff < 1e-4, f"{name}: embeddings differ by {diff}"
    report = Report(__file__, "transformers")
    note = f"llama hidden {a.hidden}, {a.layers} layers, batch {B}, {a.threads} thread(s); embeddings agree"
    for name, n, (x, y) in (("texts", a.texts, (ours_text, hf_text)), ("images", a.images, (ours_image, hf_image))):
        def rate(fn, n=n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            return n / (time.perf_counter() - t0)

        res = interleave({"ours": lambda x=x: rate(x), "hf": lambda y=y: rate(y)}, a.repeats, warmup=1)
        report.add(ratio_row("embedder", f"embed {n} {name}", res["ours"], res["hf"], unit=f"{name}/s",
                             higher_is_better=True, peer_name="transformers LlamaForCausalLM hidden_states",
                             peer_version=report.env["versions"]["transformers"], metric=f"{name}/s", note=note))
    if a.plot_dir:
        sizes = [n for n in (16, 32, 64, 128) if n <= a.texts]
        series: dict = {}
        with torch.inference_mode():
            for n in sizes:
                growth_point(series, n, {"vlm Embedder": lambda n=n: ours_text(n),
                                         "transformers LlamaForCausalLM": lambda n=n: hf_text(n)}, a.repeats)
        report.plot(a.plot_dir, "embedder.png", f"text embedding, llama hidden {a.hidden}, "
                    f"{a.layers} layers, batch {B}, {a.threads} thread(s)", "texts", series)
    report.finish(a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
