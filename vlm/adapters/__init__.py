"""Adapters: parameter-efficient parts registered under the registry's ``adapter`` kind, through peft.

One file per adapter type, registering itself (``lora.py``, ``soft_prompt.py``). An adapter class declares
``mode`` (its word in a model's ``trainable`` config: ``lora``, ``prompt``), ``targets`` (``"module"``:
any nn.Module such as a tower, ``"llm"``: a transformers LM) and ``wraps`` (True: ``apply`` returns a new
outer module, as peft's prompt learning does; False: it changes the module in place), and implements
``apply(module, target) -> module``, ``owns(param_name) -> bool``, ``save(module, dir)`` and
``load(module, dir, target) -> module`` in peft's own formats. :mod:`vlm.trainable` finds the adapters by
their ``mode`` through the registry; see it for how a model config chooses them.
"""
