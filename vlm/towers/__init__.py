"""Vision and text towers, one family per file, registered on import under a spec prefix:
``tiny:`` (random-init, tests/demos), ``open_clip:``, ``timm:``, ``hf:``, ``dual_codebook:``.
The protocols are in :mod:`vlm.towers.base`."""
