"""CapFilt (Li et al., "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language
Understanding and Generation", ICML 2022, section 3.3): bootstrap noisy image-text pairs with a captioner
and a filter, then pretrain again on the cleaned set.

``config.py`` holds the typed recipe, ``bootstrap.py`` the captioning, filtering and writing of the cleaned
shards, ``pipeline.py`` the chain of runs (``counterpoint capfilt RECIPE``) and its report.
"""
