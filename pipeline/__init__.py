"""Reproducible ablation-study pipeline for token-mixer-free vision backbones (RIFormer, CVPR 2023)."""

__version__ = "0.1.0"
