"""Synthetic offline data exercising every modality: shapes, motion, 3D scenes, pairs, CSQA, evaluation."""
