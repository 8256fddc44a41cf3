"""Distillation teachers as the core sees them: the interface, and a feature cache so training need not run them.

Teachers themselves are plug-ins (the built-in ones live in `moekit_plugins.teachers`); the core reaches them
only through `moekit.registry`.
"""

from moekit.teachers.cache import FeatureCache, build_cache
from moekit.teachers.interface import Teacher, TeacherBatch, TeacherOutput
from moekit.teachers.samples import FrameSample, load_frames, read_samples

__all__ = [
    "FeatureCache",
    "FrameSample",
    "Teacher",
    "TeacherBatch",
    "TeacherOutput",
    "build_cache",
    "load_frames",
    "read_samples",
]
