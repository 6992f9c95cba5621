"""PEFT LoRA adapters as merge experts, on a tiny random Whisper: the exact task vector
(against PEFT's own merge_and_unload), mixed full + LoRA merges, LoRS without an SVD, and
every bad adapter refused with its own error before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_state
from lors.checkpoint.adapter import open_adapter, product_svd
from lors.checkpoint.reader import open_checkpoint
from lors.cli import main
from lors.errors import CheckpointError, LorsWarning
from lors.merging import merge, validate_config
from lors.merging import primitives as P
from lors.tiny import save_tiny_base, save_tiny_expert

TARGETS = ["q_proj", "v_proj", "fc1", "fc2"]


def make_adapter(base: Path, folder: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA adapter on ``base`` with random nonzero factors (PEFT starts B at 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration.from_pretrained(base)
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **lora}
    peft_model = get_peft_model(model, LoraConfig(**options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:  # embeddings start with A = 0
                param.normal_(0, 0.05)
            elif "modules_to_save" in name or (name.endswith("bias") and param.requires_grad):
                param.add_(0.1 * torch.randn_like(param))  # saved copies, trained biases
    peft_model.save_pretrained(folder)
    return Path(folder)


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """What PEFT itself makes of ``adapter``: loaded onto ``base``, merge_and_unload()."""
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration
    model = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base),
                                      adapter).merge_and_unload()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_base(root / "base")
    full = save_tiny_expert(base, root / "full", seed=5, scale=0.01)
    adapter = make_adapter(base, root / "adapter", seed=1)
    return {"root": root, "base": base, "full": full, "adapter": adapter,
            "premerged": peft_merged(base, adapter, root / "premerged")}


def config(base, experts: dict, method="task_arithmetic", **parameters):
    return validate_config({"base": str(base), "method": method, "parameters": parameters,
                            "experts": [{"name": n, "path": str(p)} for n, p in experts.items()]})


LORA_CASES = {
    "plain": {},
    "rslora": {"use_rslora": True, "lora_alpha": 6},
    "modules_to_save": {"modules_to_save": ["final_layer_norm", "conv1"]},
    "patterns": {"rank_pattern": {"fc1": 2}, "alpha_pattern": {"decoder.layers.1.fc2": 3}},
    "embedding": {"target_modules": ["q_proj", "embed_tokens"]},
    "trained biases": {"bias": "all"},
    "lora-only biases": {"bias": "lora_only"},
    "lora_bias": {"lora_bias": True},
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_delta_equals_peft_merge_and_unload(setup, tmp_path, case):
    adapter = make_adapter(setup["base"], tmp_path / "adapter", seed=2, **LORA_CASES[case])
    expected = load_state(peft_merged(setup["base"], adapter, tmp_path / "merged"))
    base = open_checkpoint(setup["base"])
    expert = open_adapter(adapter, base)
    changed = 0
    for name in base.meta:
        base_tensor = base.read(name).float()
        reference = expected[name] - base_tensor
        torch.testing.assert_close(expert.delta(name, base_tensor), reference,
                                   rtol=0, atol=1e-6, msg=name)
        changed += bool(reference.abs().max() > 0)
        factors = expert.factors(name)
        if factors is not None:  # the stated SVD is the delta's, in factored form
            u, s, vh = factors
            torch.testing.assert_close((u * s) @ vh, reference, rtol=0, atol=1e-6)
            assert torch.all(s[:-1] >= s[1:])
    assert changed >= 7


def test_fan_in_fan_out_is_what_peft_makes_of_it(setup, tmp_path):
    # PEFT ignores fan_in_fan_out on nn.Linear (every Whisper projection) and resets it on
    # save; an adapter whose config says true is still merged as B @ A, as PEFT loads it.
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["adapter"], adapter)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    expected = load_state(peft_merged(setup["base"], adapter, tmp_path / "merged"))
    base = open_checkpoint(setup["base"])
    with pytest.warns(LorsWarning, match="fan_in_fan_out"):
        expert = open_adapter(adapter, base)
    name = "model.encoder.layers.0.self_attn.q_proj.weight"
    base_tensor = base.read(name).float()
    torch.testing.assert_close(expert.delta(name, base_tensor), expected[name] - base_tensor,
                               rtol=0, atol=1e-6)


def test_product_svd_is_the_exact_thin_svd():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
    u, s, vh = product_svd(b, a, 0.7)
    torch.testing.assert_close((u * s) @ vh, 0.7 * b @ a, rtol=0, atol=1e-5)
    torch.testing.assert_close(s, torch.linalg.svdvals(0.7 * b @ a)[:5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,parameters", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("lors", {"rank": 4, "keep": 0.3}),
    ("lors", {"rank": 6, "keep": 0.2, "svd": "exact"}),
    ("svd", {"rank": 4}),
])
def test_mixed_full_and_lora_merge_equals_the_premerged_merge(setup, tmp_path, method,
                                                               parameters):
    with_adapter = {"full": setup["full"], "lora": setup["adapter"]}
    premerged = {"full": setup["full"], "lora": setup["premerged"]}
    merge(config(setup["base"], with_adapter, method, **parameters), tmp_path / "a")
    merge(config(setup["base"], premerged, method, **parameters), tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["inputs"]["experts"]["lora"]["kind"] == "lora_adapter"


def test_lors_of_a_lora_of_rank_at_most_r_is_the_delta_without_any_svd(setup, tmp_path,
                                                                       monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD was computed for a LoRA expert")
    monkeypatch.setattr(P, "truncated_svd", no_svd)
    merge(config(setup["base"], {"lora": setup["adapter"]}, "lors", rank=4, keep=0.01,
                 **{"lambda": 1.0}), tmp_path / "out")
    merged, base = load_state(tmp_path / "out"), load_state(setup["base"])
    expected = load_state(setup["premerged"])
    for name in base:  # residual exactly zero: the pruned task vector is the whole delta
        torch.testing.assert_close(merged[name] - base[name], expected[name] - base[name],
                                   rtol=0, atol=1e-6, msg=name)
    energy = [t["energy_kept_low_rank"] for t in json.loads(
        (tmp_path / "out" / "merge_report.json").read_text())["diagnostics"]["tensors"]
        if "energy_kept_low_rank" in t]
    assert energy and all(e == [1.0] or e == [pytest.approx(1.0, abs=1e-5)] for e in energy)


def test_pickled_adapter_is_read_with_weights_only(setup, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["adapter"], adapter)
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    merge(config(setup["base"], {"lora": adapter}, **{"lambda": 1.0}), tmp_path / "out")
    merged, expected = load_state(tmp_path / "out"), load_state(setup["premerged"])
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6)


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _other_size_adapter(setup, adapter: Path) -> None:
    other = save_tiny_base(adapter.parent / "wide", d_model=48)
    shutil.rmtree(adapter)
    make_adapter(other, adapter, seed=3)


BAD = {
    "dora": (lambda s, a: _edit_config(a, use_dora=True), "use_dora is set; DoRA"),
    "ia3": (lambda s, a: _edit_config(a, peft_type="IA3"), "peft_type is 'IA3'"),
    "loha": (lambda s, a: _edit_config(a, peft_type="LOHA"), "LoRA adapters"),
    "lokr": (lambda s, a: _edit_config(a, peft_type="LOKR"), "peft_type is 'LOKR'"),
    "adalora": (lambda s, a: _edit_config(a, peft_type="ADALORA"), "peft_type is 'ADALORA'"),
    "no weights": (lambda s, a: (a / "adapter_model.safetensors").unlink(),
                   "no adapter_model.safetensors.*weights_only"),
    "unreadable config": (lambda s, a: (a / "adapter_config.json").write_text("{r: 4,"),
                          "unreadable adapter config"),
    "absent target": (lambda s, a: _edit_config(a, target_modules=["q_proj", "c_attn"]),
                      r"target_modules \['c_attn'\] match no module of the base"),
    "module absent": (lambda s, a: _rename_tensors(a, "self_attn.q_proj", "self_attn.qkv"),
                      "does not have: this adapter was made for another model"),
    "other shapes": (_other_size_adapter, r"do not fit the base's .* \[32, 32\]"),
    "rank mismatch": (lambda s, a: _edit_config(a, r=8), "with rank 8"),
}


def _rename_tensors(adapter: Path, old: str, new: str) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = {k.replace(old, new): v for k, v in load_file(path).items()}
    save_file(tensors, path)


@pytest.mark.parametrize("case", BAD)
def test_bad_adapters_are_refused_before_writing(setup, tmp_path, case, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["adapter"], adapter)
    spoil, message = BAD[case]
    spoil(setup, adapter)
    with pytest.raises(CheckpointError, match=message):
        merge(config(setup["base"], {"full": setup["full"], "lora": adapter}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code = main(["merge", "--base", str(setup["base"]), "--expert", f"lora={adapter}",
                 "--method", "lors", "--out", str(tmp_path / "cli")])
    assert code == 2 and "lors: error: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] + (
        ["wide"] if case == "other shapes" else [])


def test_another_base_named_in_the_adapter_only_warns(setup, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(setup["adapter"], adapter)
    _edit_config(adapter, base_model_name_or_path="openai/whisper-large-v3")
    with pytest.warns(LorsWarning, match="base_model_name_or_path is 'openai/whisper-large-v3'"):
        merge(config(setup["base"], {"lora": adapter}), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_adapter_written_by_lors_train_merges(tmp_path):
    from conftest import make_tiny_speech
    from lors.data.manifest import write_manifest
    from lors.training import TrainConfig, train
    base = save_tiny_base(tmp_path / "base", chunk_seconds=10)
    manifest = write_manifest(tmp_path / "manifest.jsonl",
                              make_tiny_speech(tmp_path, {"train": 4, "dev": 2}))
    trained = tmp_path / "lora"
    train(TrainConfig(base=str(base), manifest=str(manifest), pairs=[("de", "asr")],
                      out=str(trained), mode="lora", max_steps=2, batch_size=4,
                      learning_rate=1e-2, eval_every=2, cache_dir=str(tmp_path / "cache"),
                      show_progress=False, cpu=True))
    merge(config(base, {"de": trained / "adapter"}, **{"lambda": 1.0}), tmp_path / "out")
    merged, expected = load_state(tmp_path / "out"), load_state(trained)
    base_state = load_state(base)
    assert any(not torch.equal(expected[n], base_state[n]) for n in expected)
    for name in expected:  # the adapter merges to the full model lors train wrote beside it
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-5, msg=name)


def test_lors_of_a_lora_of_rank_above_r_uses_its_exact_truncated_svd():
    from lors.merging.context import Known, OpContext
    from lors.merging.methods import OPS
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(48, 6, generator=g), torch.randn(6, 40, generator=g)
    tau = 0.5 * b @ a
    params = {"lambda": 1.0, "rank": 3, "keep": 0.1, "svd": "randomized", "svd_oversample": 10,
              "svd_niter": 2, "seed": 0}
    ctx = OpContext("m", [1.0], params, lambda i: torch.Generator().manual_seed(i),
                    known=[Known(factors=product_svd(b, a, 0.5))])
    expected = P.lors_prune(tau, 3, 0.1, exact=True)
    torch.testing.assert_close(OPS["lors"].combine([tau], ctx), expected, rtol=0, atol=1e-4)


def test_search_with_a_lora_expert_scores_what_the_engine_writes(setup, tmp_path):
    from lors.experiment.taskvectors import TaskVectors
    experts = {"full": str(setup["full"]), "lora": str(setup["adapter"])}
    vectors = TaskVectors(str(setup["base"]), experts)
    state = vectors.state(vectors.delta("lors", {"rank": 2, "keep": 0.3}), 0.6)
    merge(config(setup["base"], experts, "lors", rank=2, keep=0.3, **{"lambda": 0.6}),
          tmp_path / "out", diagnostics=False)
    reference = load_state(tmp_path / "out")
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_diagnostics_from_lora_factors_equal_those_of_the_dense_task_vectors(setup, tmp_path):
    second = make_adapter(setup["base"], tmp_path / "second", seed=7, r=2)
    adapters = {"a": setup["adapter"], "b": second}
    premerged = {"a": setup["premerged"], "b": peft_merged(setup["base"], second, tmp_path / "m")}
    reports = []
    for name, experts in (("lora", adapters), ("full", premerged)):
        merge(config(setup["base"], experts, "lors", rank=4), tmp_path / name)
        reports.append(json.loads((tmp_path / name / "merge_report.json").read_text())
                       ["diagnostics"])
    lora, full = reports
    assert lora["model"]["task_vector_norms"] == pytest.approx(
        full["model"]["task_vector_norms"], abs=2e-6)
    assert lora["model"]["cosine"] == [pytest.approx(row, abs=2e-6)
                                       for row in full["model"]["cosine"]]
    for ours, theirs in zip(lora["tensors"], full["tensors"]):
        assert ours["name"] == theirs["name"]
        assert ours["task_vector_norms"] == pytest.approx(theirs["task_vector_norms"], abs=2e-6)
        assert ours["cosine"] == [pytest.approx(row, abs=1e-4) for row in theirs["cosine"]]
