"""MONAI-based LightningModules and data for chest X-ray segmentation and classification.

No NVFlare imports here: the same modules train centrally with a plain Trainer and under
NVFlare's Lightning Client API.
"""
