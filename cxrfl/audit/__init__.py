"""The privacy audit: attacks on this project's own updates and models."""
