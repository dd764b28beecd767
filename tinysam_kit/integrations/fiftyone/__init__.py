"""FiftyOne integration: labels, the `apply_model` model, dataset-wide runs, the App plugin (`plugin/`)."""
