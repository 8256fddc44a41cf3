"""A rich progress display for conversions: bytes written with speed and ETA, decoder layers done; silent when
disabled (--quiet)."""

from __future__ import annotations

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from moekit.io.writer import PlannedTensor


class ConversionProgress:
    def __init__(self, total_bytes: int, num_layers: int, layer_keys: dict[int, list[str]], enabled: bool = True):
        self.remaining = {layer: set(keys) for layer, keys in layer_keys.items() if keys}
        self.key_layer = {k: layer for layer, keys in layer_keys.items() for k in keys}
        self.num_layers = num_layers
        self.done = 0
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task(self._label(), total=total_bytes)

    def _label(self) -> str:
        return f"layers {self.done}/{self.num_layers}"

    def __enter__(self) -> ConversionProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, tensor: PlannedTensor) -> None:
        layer = self.key_layer.get(tensor.key)
        if layer is not None:
            self.remaining[layer].discard(tensor.key)
            if not self.remaining[layer]:
                self.done += 1
        self.progress.update(self.task, advance=tensor.nbytes, description=self._label())
