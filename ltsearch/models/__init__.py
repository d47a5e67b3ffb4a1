"""Backbones split into stages so an augmenter can sit at any stage boundary."""

from ltsearch.models.base import Backbone, FeatureInfo, create_backbone, num_boundaries

__all__ = ["Backbone", "FeatureInfo", "create_backbone", "num_boundaries"]
