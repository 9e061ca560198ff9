"""vlm/llms"""
