"""llama.cpp's own converter takes moekit's native exports, and the GGUF holds the experts at their true shapes
(slow: it downloads the llama-cpp-python sdist and builds a converter venv once; `make test-all`). The full
client check, vLLM and llama.cpp generation included, is `bench/serve_check.py` (docs/serving.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("serve_check", ROOT / "bench" / "serve_check.py")
serve_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = serve_check  # dataclasses look their module up
spec.loader.exec_module(serve_check)

GGUF_TARGETS = [t for t, target in serve_check.TARGETS.items() if "llamacpp" in target.clients]


@pytest.mark.slow
@pytest.mark.parametrize("target", GGUF_TARGETS)
def test_llama_cpp_converts_every_gguf_target(target, tmp_path):
    work = ROOT / "bench" / "out" / "serve"
    work.mkdir(parents=True, exist_ok=True)
    folder, reference = serve_check.export(work, target)
    assert len(reference["tokens"]) == serve_check.NEW_TOKENS
    gguf = tmp_path / f"{target}.gguf"
    done = serve_check.convert(work, folder, gguf, target)
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = serve_check.gguf_expert_shapes(work, gguf)
    assert shapes, f"no expert tensors in {gguf}"
    hidden, width = (576, 1536) if target == "mixtral_smollm2" else (128, 192)
    for name, shape in shapes.items():  # ne0 first: [H, I, E] for gate/up, [I, H, E] for down, 2I when merged
        assert shape[-1] == 3 and sorted(shape[:2]) in ([hidden, width], [hidden, 2 * width]), (name, shape)


@pytest.mark.slow
def test_the_vllm_plugin_serves_a_moekit_checkpoint_with_transformers_logits():
    # a Qwen2 MoE with a trained shared-expert gate and router: what no stock twin expresses
    row = serve_check.check(ROOT / "bench" / "out" / "serve", "plugin_qwen2", ["vllm"], build=False)
    assert row["vllm"].startswith("same tokens"), row["vllm"]
    assert float(row["vllm"].rsplit(" ", 1)[1]) < 1e-4, row["vllm"]
