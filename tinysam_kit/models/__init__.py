"""The networks (TinyViT, SAM ViT, prompt encoder, mask decoder), checkpoints, and the model registry."""
