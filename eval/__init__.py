"""Evaluation: plain functions per task (``zeroshot``, ``retrieval``, ``caption``, ``vqa``), metrics and
reports. Run through ``vlm eval <task>``."""
