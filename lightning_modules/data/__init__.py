"""Data layer: manifests, image reading, the synthetic phantom, real-data adapters, splits, checks."""
