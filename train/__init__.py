"""Training recipes: one explicit loop per recipe (``pretrain.py``, ``finetune.py``), shared helpers in
``common.py``, configs in ``configs/``. Run through ``vlm train CONFIG [key=value ...]``."""
