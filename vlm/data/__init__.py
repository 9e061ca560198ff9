"""Streaming data on webdataset. See :mod:`vlm.data.wds` (the pipeline), :mod:`vlm.data.batch` (the
one batch contract), :mod:`vlm.data.prompts` (language picking and templates), :mod:`vlm.data.mixing`
(language and source mixing recipes)."""
