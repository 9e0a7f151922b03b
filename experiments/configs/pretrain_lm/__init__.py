"""Configs of experiments/pretrain_lm.py."""
