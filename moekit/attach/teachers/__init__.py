"""Distillation teachers as the core sees them: the interface, the feature cache that lets training skip them, the
sample list the cache reads, and the per-batch teacher features the synergy heads get.

Teachers themselves are plug-ins (the built-in ones live in `moekit_plugins.teachers`); the core reaches them
only through `moekit.plugins.registry`.
"""

from moekit.attach.teachers.cache import FeatureCache, build_cache
from moekit.attach.teachers.interface import Teacher, TeacherBatch, TeacherOutput
from moekit.attach.teachers.samples import FrameSample, load_frames, read_samples

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
