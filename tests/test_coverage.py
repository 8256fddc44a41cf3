"""Coverage as a number: every dense decoder family of transformers' mappings, built tiny from its config,
upcycled with no override and compared with its dense self (docs/upcycling.md has the table)."""

import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import moekit
from moekit.demo.shrink import text_inputs_any, tiny_model_any
from moekit.demo.sweep import SPEC, TOLERANCE, coverage, sweep
from moekit.upcycle.convert import convert

# Dense families moekit refuses on purpose, and why (the refusal must say so).
REFUSED = {
    "bitnet": "ffn_sub_norm",  # a norm inside the FFN: experts made of its projections would change the model
    "kosmos-2": "ffn_layernorm",  # likewise
    "kosmos-2.5": "ffn_layernorm",
    "blip": "no list of decoder layers",  # BLIP's text decoder splits its FFN across BERT-style modules
    "pi0": "no hidden_size",  # the action expert and the VLM share layers; no single language-model config
}
# Model types of the mappings that are not dense decoders: left out of the goal's denominator.
NOT_DENSE = {"moe": 53, "encoder": 18, "no_ffn": 3}
# Model types whose tiny config moekit's shrinker cannot build or run here (optional packages, per-layer
# configs): left out of the denominator too, listed in docs/upcycling.md.
NOT_BUILT = 38


@pytest.fixture(scope="module")
def outcomes():
    torch.set_num_threads(1)
    return {o.model_type: o for o in sweep()}


def test_at_least_95_percent_of_dense_families_upcycle_and_keep_their_function(outcomes):
    done, total = coverage(list(outcomes.values()))
    assert total >= 150 and done / total >= 0.95, (done, total)
    silent = [t for t, o in outcomes.items() if o.outcome in ("mismatch", "crash")]
    assert not silent, {t: outcomes[t].detail for t in silent}  # zero silent mismatches, zero half-conversions
    for model_type, o in outcomes.items():
        if o.outcome == "upcycled":
            assert o.difference <= TOLERANCE, model_type


def test_refusals_are_the_expected_ones_and_say_why(outcomes):
    refused = {t: o.detail for t, o in outcomes.items() if o.outcome == "refused"}
    assert set(refused) == set(REFUSED)
    for model_type, words in REFUSED.items():
        assert words in refused[model_type], (model_type, refused[model_type])
    counts = {kind: sum(o.outcome == kind for o in outcomes.values()) for kind in NOT_DENSE}
    assert counts == NOT_DENSE
    assert sum(o.outcome == "not_built" for o in outcomes.values()) == NOT_BUILT
    for model_type in ("mixtral", "qwen3_moe"):
        assert "already MoE" in outcomes[model_type].detail
    assert "encoder-only" in outcomes["bert"].detail and "no FFN" in outcomes["mamba"].detail


# Streaming conversion and the round trip on a representative subset: gated, fused and plain FFNs, Conv1D
# projections, FFNs inline in the layer and FFNs that add the residual themselves, nested FFNs, VLMs.
REPRESENTATIVE = [
    "llama",
    "qwen2_5_vl",
    "gemma3",
    "phi3",
    "phi",
    "gpt2",
    "opt",
    "bart",
    "mpt",
    "bloom",
    "moshi",
    "glm4v",
    "olmo2",
    "granite",
    "recurrent_gemma",
    "chameleon",
    "hrm_text",  # gate and up saved merged, gate first
    "molmo2",  # gate and up saved merged, up first
    "falcon_h1",  # a non-persistent buffer set only by _init_weights (mup_vector) must survive the reload
]


def _streamed_and_reloaded(model_type: str) -> tuple[float, float, dict]:
    """Largest logit differences of the streamed and the saved-and-reloaded MoE to the dense model, and
    transformers' loading report of the reload."""
    with tempfile.TemporaryDirectory() as scratch:  # the sweep runs this for ~100 families: nothing may stay
        return _in_folder(model_type, Path(scratch))


def _in_folder(model_type: str, folder: Path) -> tuple[float, float, dict]:
    dense = tiny_model_any(model_type)
    dense.save_pretrained(folder / "dense")
    batch = text_inputs_any()
    with torch.no_grad():
        want = dense(**batch, use_cache=False).logits
    convert(
        moekit.UpcycleSpec(base=str(folder / "dense"), **SPEC.model_dump(exclude={"base"})),
        folder / "moe",
        progress=False,
    )
    streamed = moekit.load(folder / "moe").eval()
    moekit.upcycle(dense, SPEC).save_pretrained(folder / "saved")
    auto = (
        AutoModelForImageTextToText if streamed.config.moekit["auto"] == "image-text-to-text" else AutoModelForCausalLM
    )
    reloaded, report = auto.from_pretrained(folder / "saved", output_loading_info=True)
    with torch.no_grad():
        return (
            float((streamed(**batch, use_cache=False).logits - want).abs().max()),
            float((reloaded.eval()(**batch, use_cache=False).logits - want).abs().max()),
            report,
        )


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_streaming_conversion_and_round_trip_keep_the_function(model_type):
    streamed, reloaded, report = _streamed_and_reloaded(model_type)
    assert streamed <= TOLERANCE and reloaded <= TOLERANCE
    # nothing left over or missing: the dense-refusal guard is ignored whatever the family makes of it on saving
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["mismatched_keys"], report


# Families that upcycle in memory (and keep their logits) but whose streaming conversion or save/Auto-load round
# trip fails today: open work on issue 11, listed so that the sweep fails on any new gap (docs/upcycling.md).
STREAMING_GAPS = {
    # streaming only (the in-memory MoE saves and Auto-loads back exactly)
    "kimi_k25": "its vision tower's saved names (norm0/norm1, fc0/fc1) do not revert key by key in transformers",
    # the round trip too
    "shieldgemma2": "the dense model itself does not survive transformers' save / load (logits move by 0.77)",
}


@pytest.mark.slow
def test_streaming_and_round_trip_on_every_upcycled_family(outcomes):
    failed = {}
    for model_type, o in outcomes.items():
        if o.outcome != "upcycled":
            continue
        try:
            streamed, reloaded, report = _streamed_and_reloaded(model_type)
        except Exception as exc:  # reported together, not one at a time
            failed[model_type] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if max(streamed, reloaded) > TOLERANCE:
            failed[model_type] = f"streamed {streamed:.2e}, reloaded {reloaded:.2e}"
        elif left := {k: sorted(v)[:3] for k, v in report.items() if k != "error_msgs" and v}:
            failed[model_type] = f"reloaded with {left}"
    new = {k: v for k, v in failed.items() if k not in STREAMING_GAPS}
    assert not new, new
    mended = sorted(k for k in STREAMING_GAPS if k not in failed)
    assert not mended, f"these work now: remove them from STREAMING_GAPS: {mended}"
