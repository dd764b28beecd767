"""Shared data and helpers below every other layer: image decoding, preprocessing, the synthetic world."""
