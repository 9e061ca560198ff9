"""vlm/adapters"""
