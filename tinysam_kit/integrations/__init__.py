"""Front ends over the inference core: FiftyOne, Label Studio and Ray."""
