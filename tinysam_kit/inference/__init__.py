"""Inference on top of the engines: the prompt predictor and its embedding caches, everything mode, mask
encodings, batch runs, and the policy every front end shares (`policy`)."""
