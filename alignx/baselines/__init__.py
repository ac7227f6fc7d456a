"""Baselines AlignX is compared with (METHOD.md): the base model, the multi-task adapter, the
uncalibrated softmax router and an H3Fusion-style token-level MoE, plus their cost.

``systems`` loads any system for serving and scoring, ``h3fusion`` trains and loads the token
MoE, ``cost`` measures latency and memory per system.
"""
