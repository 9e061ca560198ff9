"""vlm: multilingual vision-language models.

Parts (towers, projectors, LLMs, adapters) are built from spec strings through :mod:`vlm.registry`;
data streams from webdataset shards through :mod:`vlm.data`; configs are typed dataclasses
(:mod:`vlm.config`). Heavy imports (torch, transformers) happen in the submodules, not here.
"""
__version__ = "0.1.0"
