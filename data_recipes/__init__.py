"""Shard recipes: building shard sets from rows or image folders, inspecting them, the embedded demo
dataset, and language/source mixing. CLI: ``vlm shards build|inspect|demo``."""
