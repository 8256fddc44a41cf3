"""Run under torchrun by test_train_distributed: run a recipe straight into OUT/straight, then again into
OUT/resumed, crashing after N micro-batches and resuming."""

import sys

import torch

from moekit.pipeline import run_plan
from moekit.plugins.registry import registry
from moekit.recipe import load_plan


def tiny_source(request):
    return registry().build("batch_source", "tiny", request.stage.data_params, request=request)


def crash_after(micro_batches: int):
    """A batch source that fails like a killed job once it has handed out `micro_batches` micro-batches."""
    handed = 0

    def source(request):
        nonlocal handed
        for batch in tiny_source(request):
            if handed == micro_batches:
                raise KeyboardInterrupt("simulated crash")
            handed += 1
            yield batch

    return source


if __name__ == "__main__":
    torch.set_num_threads(1)
    recipe, out, crash = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run_plan(load_plan(recipe, [f"output_dir={out}/straight"]))
    resumed = load_plan(recipe, [f"output_dir={out}/resumed"])
    try:
        run_plan(resumed, batch_source=crash_after(crash))
    except KeyboardInterrupt:
        pass
    else:
        raise SystemExit("the simulated crash did not happen")
    run_plan(resumed, resume=True)
