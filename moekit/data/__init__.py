"""Data: conversation datasets with images, videos and multi-view 3D scenes, mixtures, synthetic data."""
