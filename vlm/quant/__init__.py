"""Vector quantisers (:mod:`vlm.quant.rvq`: residual VQ with one EMA codebook shared across depths)."""
from vlm.quant.rvq import ResidualVQ, codebook_stats

__all__ = ["ResidualVQ", "codebook_stats"]
