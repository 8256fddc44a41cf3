"""Analyses of trained MoE models (routing distributions)."""
