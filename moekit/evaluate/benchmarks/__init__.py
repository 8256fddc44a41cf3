"""Benchmarks `moekit eval` scores, read from their released files (docs/evaluation.md)."""

from moekit.evaluate.benchmarks.base import Benchmark, Question, Scored
from moekit.evaluate.benchmarks.image import CVBENCH, MMSTAR
from moekit.evaluate.benchmarks.own import CHOICES, CHOICES_GENERATE
from moekit.evaluate.benchmarks.scene import SCANQA, SQA3D
from moekit.evaluate.benchmarks.video import VIDEOMME, VSIBENCH

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b for b in (MMSTAR, CVBENCH, VSIBENCH, VIDEOMME, SCANQA, SQA3D, CHOICES, CHOICES_GENERATE)
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Benchmark", "Question", "Scored", "get_benchmark"]
