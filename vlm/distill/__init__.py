"""Distillation into small students (issue 12, items 5-6).

- :mod:`vlm.distill.dho`: DHO, a small image tower with a supervised CE head and a KD head distilled from a
  teacher's zero-shot logits; inference mixes the two heads (``alpha``, ``beta``).
- :mod:`vlm.distill.cache`: the teacher's image embeddings cached by sample key (safetensors), so the
  teacher runs once per image however many epochs or resumes the student trains.
- :mod:`vlm.distill.text_student`: BiStil-style language-specific text students: a smaller text tower
  distilled from a dual encoder's multilingual one, dropped into the same dual encoder (image side unchanged).

Core modules: nothing here imports ``vlm.train``, ``vlm.eval`` or ``vlm.cli``; the recipes
(``train/distill.py``, ``train/distill_text.py``) wire data, teacher class embeddings and the loop.
"""
from vlm.distill.cache import TeacherEmbeddingCache, fill_cache
from vlm.distill.dho import DHOConfig, DHOStudent, dho_loss, mix_heads

__all__ = ["TeacherEmbeddingCache", "fill_cache", "DHOConfig", "DHOStudent", "dho_loss", "mix_heads"]
