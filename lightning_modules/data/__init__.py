"""Data layer: manifests, image reading, the synthetic phantom, real-data importers, splits, checks."""
