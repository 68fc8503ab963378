"""cxr-fl: federated chest X-ray segmentation and classification."""

__version__ = "0.1.0"
