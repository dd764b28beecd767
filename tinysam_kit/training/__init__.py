"""Training TinySAM-family models: distillation from SAM teachers and the bundled demo model."""
