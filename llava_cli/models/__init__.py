"""Checkpoints: hub downloads and the cache, loading a model and its processor, and turning
images and videos into the model's inputs per family (tiling, image tokens).

May import: prompt, media, base.
"""
