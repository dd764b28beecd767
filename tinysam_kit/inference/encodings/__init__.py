"""Mask encodings: COCO RLE (coco), Label Studio brush RLE (labelstudio), polygons (polygons)."""
