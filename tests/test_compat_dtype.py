"""The same-base check (an expert must be close to the base) and the output config's dtype."""

import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration

from lors.checkpoint.compat import (MAX_COMPARED, MIN_COSINE, check_experts, sample_tensors,
                                    similarity, strided_rows)
from lors.checkpoint.reader import open_checkpoint
from lors.checkpoint.writer import write_config
from lors.errors import CompatibilityError, LorsWarning
from lors.tiny import save_tiny_base, save_tiny_expert


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """An expert fine-tuned from another random initialisation of the same tiny architecture."""
    root = tmp_path_factory.mktemp("foreign")
    other_base = save_tiny_base(root / "other_base", seed=1)
    return save_tiny_expert(other_base, root / "foreign", seed=3)


def check(tiny, experts: dict, **kwargs):
    return check_experts(open_checkpoint(tiny["base"]),
                         {name: open_checkpoint(path) for name, path in experts.items()},
                         **kwargs)


def resave(source, folder, dtype):
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    model.to(dtype).save_pretrained(folder)
    return folder


# --- the same-base check -------------------------------------------------------------------

def test_sample_covers_embedding_attention_and_ffn(tiny_models):
    names = sample_tensors(open_checkpoint(tiny_models["base"]))
    assert names == sample_tensors(open_checkpoint(tiny_models["base"]))  # deterministic
    assert len(names) == 8
    assert "model.decoder.embed_tokens.weight" in names
    for side in ("encoder", "decoder"):
        assert any(f"{side}.layers" in n and "self_attn" in n for n in names)
        assert any(f"{side}.layers" in n and ".fc" in n for n in names)
    assert any("encoder_attn" in n for n in names)


def test_expert_from_another_init_is_refused_with_figures(tiny_models, foreign):
    with pytest.raises(CompatibilityError) as caught:
        check(tiny_models, {"e0": tiny_models["experts"]["e0"], "foreign": foreign})
    message = str(caught.value)
    assert "expert 'foreign'" in message and str(foreign) in message
    assert "'e0'" not in message  # only the foreign expert is blamed
    assert "not fine-tuned from this base" in message
    assert "8 of 8 sampled weight tensors" in message
    assert "model." in message and "relative distance 1." in message and "cosine" in message
    assert "allow_other_base" in message and "--allow-other-base" in message
    assert "not that it was trained from it bit for bit" in message


def test_allow_other_base_merges_with_a_warning(tiny_models, foreign):
    with pytest.warns(LorsWarning, match=r"expert 'foreign'.*cosine.*allow_other_base is set"):
        figures = check(tiny_models, {"foreign": foreign}, allow_other_base=True)
    assert all(abs(s.cosine) < 0.2 and s.distance > 1.0 for s in figures["foreign"])


def test_partly_foreign_expert_is_refused(tiny_models, foreign, tmp_path):
    """The decoder of another model on this base's encoder: any foreign tensor refuses."""
    mixed = shutil.copytree(tiny_models["experts"]["e0"], tmp_path / "mixed")
    ours, theirs = load_file(mixed / "model.safetensors"), load_file(foreign / "model.safetensors")
    ours.update({k: v for k, v in theirs.items() if k.startswith("model.decoder.layers.")})
    save_file(ours, mixed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompatibilityError, match=r"expert 'mixed'.*4 of 8 sampled.*decoder"):
        check(tiny_models, {"mixed": mixed})


def test_fine_tune_sized_perturbation_passes(tiny_models, tmp_path):
    """5% of the weights' RMS (0.02 at init): a large full fine-tune. The tiny test experts
    (noise as large as the weights, cosine ~0.7) pass too, without a warning."""
    tuned = save_tiny_expert(tiny_models["base"], tmp_path / "tuned", seed=5, scale=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = check(tiny_models, {"tuned": tuned, **tiny_models["experts"]})
    assert all(s.distance < 0.1 and s.cosine > 0.99 for s in figures["tuned"])
    assert all(s.cosine > MIN_COSINE + 0.1 for s in figures["e1"])


def test_identical_and_half_precision_experts_pass(tiny_models, tmp_path):
    """The base itself, and the base or an expert stored in float16 / bfloat16."""
    base = tiny_models["base"]
    experts = {"same": base,
               "half": resave(base, tmp_path / "half", torch.float16),
               "bf16": resave(base, tmp_path / "bf16", torch.bfloat16),
               "e0-half": resave(tiny_models["experts"]["e0"], tmp_path / "e0h", torch.float16)}
    assert open_checkpoint(experts["half"]).meta["model.decoder.embed_tokens.weight"].dtype \
        == torch.float16
    figures = check(tiny_models, experts)
    assert all(s.distance == 0.0 and s.cosine == pytest.approx(1.0) for s in figures["same"])
    assert all(s.distance < 1e-3 and s.cosine > 0.9999 for s in figures["half"])
    assert all(s.distance < 1e-2 and s.cosine > 0.9999 for s in figures["bf16"])


def test_nan_in_a_sampled_tensor_is_left_to_the_merge_check(tiny_models, tmp_path):
    """NaN figures do not refuse as 'another base': the merge names the NaN tensor itself."""
    bad = shutil.copytree(tiny_models["experts"]["e0"], tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.decoder.embed_tokens.weight"][3, 4] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    figures = check(tiny_models, {"bad": bad})
    assert any(math.isnan(s.cosine) for s in figures["bad"])


def test_similarity_figures():
    base = torch.randn(300, 40, dtype=torch.float64)
    identical = similarity("t", base, base.clone())
    assert identical.distance == 0.0 and identical.cosine == pytest.approx(1.0, abs=1e-12)
    same = similarity("t", base.float(), base.half())
    assert same.distance < 1e-3 and same.cosine > 0.99999
    scaled = similarity("t", base, 2 * base)
    assert scaled.distance == pytest.approx(1.0) and scaled.cosine == pytest.approx(1.0)
    opposite = similarity("t", base, -base)
    assert opposite.distance == pytest.approx(2.0) and opposite.cosine == pytest.approx(-1.0)
    zeros = similarity("t", torch.zeros(4, 4), torch.zeros(4, 4))
    assert (zeros.distance, zeros.cosine) == (0.0, 1.0)
    from_zero = similarity("t", torch.zeros(4, 4), torch.ones(4, 4))
    assert (from_zero.distance, from_zero.cosine) == (math.inf, 0.0)


def test_strided_rows_bound_the_compared_elements():
    """A Whisper-base-sized token embedding is compared on every 26th row (1,995 rows)."""
    # Row i holds the value i, so the check names which rows were taken (and no
    # uninitialised NaN can make torch.equal fail at random).
    embedding = torch.arange(51865, dtype=torch.float32).unsqueeze(1).expand(51865, 512)
    rows = strided_rows(embedding)
    assert rows.shape == (1995, 512) and rows.numel() <= MAX_COMPARED
    assert torch.equal(rows[:, 0], torch.arange(0, 51865, 26, dtype=torch.float32))
    small = torch.zeros(2048, 512)
    assert strided_rows(small).shape == small.shape


# --- the output dtype --------------------------------------------------------------------

def half_base(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["base"], tmp_path / "half_base")
    return resave(tiny_models["base"], folder, torch.float16)


@pytest.mark.parametrize("stale", [{"dtype": "float16"}, {"torch_dtype": "float16"},
                                   {"dtype": "float16", "torch_dtype": "bfloat16"}])
def test_write_config_states_only_the_written_dtype(tmp_path, stale):
    base_config = {"model_type": "whisper", **WhisperConfig().to_dict(), **stale}
    write_config(tmp_path, base_config, torch.float32)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "float32"
    assert WhisperConfig.from_pretrained(tmp_path).dtype == torch.float32


@pytest.mark.parametrize("written", [torch.float32, torch.bfloat16])
def test_weights_written_in_another_dtype_load_in_it(tiny_models, tmp_path, written):
    """A float16 base's config over weights stored in ``written``: transformers loads those."""
    base = half_base(tiny_models, tmp_path)
    out = tmp_path / "out"
    resave(base, out, written)
    write_config(out, json.loads((base / "config.json").read_text()), written)
    model = WhisperForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {written}


def test_merge_of_a_half_base_to_float32_loads_as_float32(tiny_models, tmp_path):
    from lors.merging import merge, validate_config
    base = half_base(tiny_models, tmp_path)
    experts = [{"name": n, "path": str(p)} for n, p in tiny_models["experts"].items()]
    merge(validate_config({"base": str(base), "method": "task_arithmetic", "experts": experts,
                           "dtype": "float32"}), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
