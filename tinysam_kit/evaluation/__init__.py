"""Measurements of models and engines: prompt and everything-mode quality, quantization fidelity."""
