"""vlm/projectors"""
