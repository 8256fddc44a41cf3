"""VGGT's aggregator (own implementation, loads the released checkpoint) and the VGGT teacher."""

from moekit_plugins.teachers.vggt.config import VGGTArch
from moekit_plugins.teachers.vggt.teacher import VGGTParams, VGGTTeacher

__all__ = ["VGGTArch", "VGGTParams", "VGGTTeacher"]
