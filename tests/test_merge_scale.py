"""Merging at scale: TIES elected over row blocks (bit for bit the stacked election, in
bounded memory), unchecked reads whose NaN/Inf errors still name the input at fault, and
``--device`` (CUDA merges equal the CPU's; a clear error without a GPU)."""

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_state
from lors.checkpoint.reader import open_checkpoint
from lors.cli import main
from lors.errors import CheckpointError, ConfigError, MergeError
from lors.merging import core, engine, merge, methods, validate_config
from lors.merging import primitives as P
from lors.merging.context import OpContext


def stacked_ties(taus, weights, keep, thresholds=None, sparsify=None):
    """TIES as it was written before row blocks: whole pruned parts, stacked, elected."""
    parts = []
    for i, tau in enumerate(taus):
        if sparsify is not None:
            parts.append(sparsify(i, tau))
        elif thresholds is not None:
            parts.append(tau * (tau.abs() >= thresholds[i]))
        else:
            parts.append(P.magnitude_prune(tau, keep))
    stacked = torch.stack(parts)
    stacked *= torch.tensor(weights).reshape(-1, *([1] * taus[0].dim()))
    return P.disjoint_mean(stacked, P.elect_sign(stacked))


def context(weights, keep, thresholds=None, **extra):
    return OpContext("t", weights, {"keep": keep, **extra},
                     lambda i: torch.Generator().manual_seed(100 + i), thresholds)


def bits(tensor):
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("shape", [(37, 11), (64, 8), (13,), (7, 3, 2), ()])
@pytest.mark.parametrize("block", [1, 6, 50, 1 << 22])  # 6 and 50 divide no row count here
def test_ties_over_row_blocks_is_the_stacked_election_bit_for_bit(monkeypatch, shape, block):
    monkeypatch.setattr(methods, "ELECT_BLOCK", block)
    g = torch.Generator().manual_seed(sum(shape) + block)
    taus = [torch.randn(shape, generator=g) for _ in range(4)]
    taus[1].view(-1)[::3] = 0.0  # exact zeros count for no sign
    weights = [1.0, 0.5, 2.0, 0.7]
    for keep in (0.2, 0.001, 1.0):  # k = 0 (nothing kept) and k = numel (everything) too
        for thresholds in (None, [0.5, 0.1, 1.0, 0.3]):
            given = list(taus)
            ctx = context(weights, keep, thresholds)
            merged = methods._elect_combine(given, ctx, methods._magnitude)
            expected = stacked_ties(taus, weights, keep, thresholds)
            assert merged.shape == torch.Size(shape)
            assert torch.equal(bits(merged), bits(expected)), (keep, thresholds)
            assert all(a is b for a, b in zip(given, taus))  # inputs kept, unmodified


def test_dare_ties_over_row_blocks_is_the_stacked_election(monkeypatch):
    monkeypatch.setattr(methods, "ELECT_BLOCK", 40)
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(29, 7, generator=g) for _ in range(3)]
    ctx = context([1.0, 1.0, 0.5], 0.5)
    merged = methods._elect_combine(list(taus), ctx, methods._dare)
    again = context([1.0, 1.0, 0.5], 0.5)
    expected = stacked_ties(taus, [1.0, 1.0, 0.5], 0.5,
                            sparsify=lambda i, t: methods._dare(i, t, again))
    assert torch.equal(bits(merged), bits(expected))


@pytest.mark.parametrize("sparsify", [methods._magnitude, methods._dare])
def test_ties_releases_the_inputs_only_when_asked(sparsify):
    taus = [torch.randn(10, 4) for _ in range(3)]
    given = list(taus)
    ctx = dataclasses.replace(context([1.0] * 3, 0.3), release_taus=True)
    expected = methods._elect_combine(list(taus), context([1.0] * 3, 0.3), sparsify)
    assert torch.equal(methods._elect_combine(given, ctx, sparsify), expected)
    assert given == [None, None, None]


def test_the_engines_ties_never_stacks_a_whole_tensor(tiny_models, tmp_path, monkeypatch):
    """The election's working set is bounded by the block, not by the tensor: every stack
    elected holds at most ELECT_BLOCK entries (or one row per expert), and the merge is the
    one elected over whole tensors."""
    config = validate_config({"base": str(tiny_models["base"]), "method": "ties",
                              "parameters": {"keep": 0.3},
                              "experts": [{"name": n, "path": str(p)}
                                          for n, p in tiny_models["experts"].items()]})
    merge(config, tmp_path / "whole", diagnostics=False)
    block = 300
    monkeypatch.setattr(methods, "ELECT_BLOCK", block)
    sizes, largest = [], []
    original = P.elect_sign

    def recording(stacked):
        sizes.append(stacked.numel())
        largest.append(max(block, stacked[0, :1].numel() * stacked.shape[0]))
        return original(stacked)
    monkeypatch.setattr(P, "elect_sign", recording)
    merge(config, tmp_path / "blocks", diagnostics=False)
    meta = open_checkpoint(str(tiny_models["base"])).meta
    biggest = max(torch.Size(m.shape).numel() for m in meta.values())  # 300 x 32 embedding
    assert max(sizes) <= block < 3 * biggest  # its whole stack would be 3 x biggest
    assert len(sizes) > len(meta)  # some tensors took several blocks
    assert all(size <= bound for size, bound in zip(sizes, largest))
    whole, blocks = load_state(tmp_path / "whole"), load_state(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_magnitude_threshold_cuts_blocks_as_the_whole_mask():
    x = torch.randn(50, 9)
    for keep in (0.0001, 0.3, 1.0):
        threshold = P.magnitude_threshold(x, keep)
        mask = P.magnitude_mask(x, keep)
        assert torch.equal(torch.cat([P.magnitude_at_least(x[a:a + 7], threshold)
                                      for a in range(0, 50, 7)]), mask)


# ------------------------------------------------ unchecked reads, checked merged tensors

def config_for(tiny, experts: dict, method="task_arithmetic", **extra):
    return validate_config({"base": str(tiny["base"]), "method": method,
                            "experts": [{"name": n, "path": str(p)} for n, p in experts.items()],
                            **extra})


def with_value(tiny, tmp_path, which, name, value, label="bad"):
    source = tiny["base"] if which == "base" else tiny["experts"][which]
    folder = shutil.copytree(source, tmp_path / label)
    tensors = load_file(folder / "model.safetensors")
    tensors[name].view(-1)[3] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("method,extra", [
    ("task_arithmetic", {}), ("ties", {}), ("lors", {}), ("lors", {"parameters": {"svd": "exact"}}),
    ("tsv", {}), ("dare", {}), ("task_arithmetic", {"groups": {"ffn": "keep_base"}})])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_inf_input_is_still_named_by_expert_and_tensor(tiny_models, tmp_path, method,
                                                                extra, value):
    name = "model.decoder.layers.1.fc1.weight"
    bad = with_value(tiny_models, tmp_path, "e0", name, value)
    experts = {"e1": tiny_models["experts"]["e1"], "bad": bad}
    with pytest.raises(CheckpointError, match=rf"expert 'bad'.*{name} contains NaN or Inf"):
        merge(config_for(tiny_models, experts, method, **extra), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_nan_in_the_base_is_named(tiny_models, tmp_path):
    name = "model.encoder.layers.0.self_attn.q_proj.bias"
    base = with_value(tiny_models, tmp_path, "base", name, float("nan"), "nanbase")
    config = validate_config({"base": str(base), "method": "task_arithmetic",
                              "allow_other_base": True,
                              "experts": [{"name": "e0", "path": str(tiny_models["experts"]["e0"])}]})
    with pytest.raises(CheckpointError, match=rf"^base \(.*nanbase\): tensor {name} contains"):
        merge(config, tmp_path / "out")


def test_finite_inputs_that_overflow_are_still_the_merges_fault(tiny_models, tmp_path):
    experts = dict(tiny_models["experts"])
    config = config_for(tiny_models, experts, "task_arithmetic", dtype="float16",
                        parameters={"lambda": 1e8})
    with pytest.raises(MergeError, match="merged tensor .* contains NaN or Inf in float16"):
        merge(config, tmp_path / "out", diagnostics=False)


def test_all_finite_is_exact_when_the_sum_overflows():
    big = torch.full((4,), 3e38)
    assert core.all_finite(big)  # the sum is inf, every entry is finite
    assert core.all_finite(torch.full((4,), 60000.0).half())
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.zeros(100, dtype=dtype)
            x[57] = bad
            assert not core.all_finite(x)


def test_unchecked_half_precision_task_vectors_equal_the_checked_ones(tiny_models, tmp_path):
    from transformers import WhisperForConditionalGeneration
    for label, path in [("base16", tiny_models["base"]), ("e16", tiny_models["experts"]["e0"])]:
        WhisperForConditionalGeneration.from_pretrained(path).half().save_pretrained(
            tmp_path / label)
    base, expert = open_checkpoint(str(tmp_path / "base16")), open_checkpoint(str(tmp_path / "e16"))
    for name, info in base.meta.items():
        if not info.dtype.is_floating_point:
            continue
        base_tensor = core.read_float(base, "base", name, check=False)
        checked = core.task_vectors({"e": expert}, name, base_tensor)[0]
        unchecked = core.task_vectors({"e": expert}, name, base_tensor, check=False)[0]
        assert unchecked.dtype == torch.float32 and torch.equal(checked, unchecked), name


@pytest.mark.parametrize("method", ["lors", "ties", "task_arithmetic"])
def test_the_engines_reused_memory_gives_the_merge_of_fresh_memory(tiny_models, tmp_path,
                                                                     method):
    """The engine prunes into recycled buffers (its workspace) and hands them back as soon
    as they are added; the written merge is bit for bit base + the op's delta computed
    without any workspace."""
    config = config_for(tiny_models, tiny_models["experts"], method)
    merge(config, tmp_path / "out", diagnostics=False, workers=2)
    written = load_state(tmp_path / "out")
    plan = engine.plan_merge(config)
    for entry in plan.entries:
        base_tensor = core.read_float(plan.base, "base", entry.name)
        if entry.op == core.COPY:
            continue
        taus = core.task_vectors(plan.experts, entry.name, base_tensor)
        delta, _ = core.merged_delta(entry, taus, plan.weights, plan.params)
        assert torch.equal(written[entry.name], base_tensor + delta), entry.name


# ---------------------------------------------------------------------------- --device

def merge_args(tiny, out, *extra):
    return ["merge", "--base", str(tiny["base"]), "--method", "lors",
            *[f"--expert={n}={p}" for n, p in tiny["experts"].items()],
            "--out", str(out), "--quiet", *extra]


def test_device_cuda_without_a_gpu_is_a_clear_error_before_any_work(tiny_models, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(merge_args(tiny_models, tmp_path / "out", "--device", "cuda"))
    err = capsys.readouterr().err
    assert code == 2
    assert ("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
            "drop --device or run on a machine with a GPU") in err
    assert list(tmp_path.iterdir()) == []
    config = config_for(tiny_models, dict(tiny_models["experts"]))
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        merge(config, tmp_path / "out", device="cuda:0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "meta", ""])
def test_unknown_devices_are_refused(tiny_models, tmp_path, capsys, device):
    code = main(merge_args(tiny_models, tmp_path / "out", "--device", device))
    err = capsys.readouterr().err
    assert code == 2 and f"--device {device}: unknown device; use cpu, cuda or cuda:N" in err
    assert list(tmp_path.iterdir()) == []


def test_a_gpu_index_beyond_the_visible_ones_is_refused(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device cuda:5: there is no GPU 5; 2 visible"):
        merge(config_for(tiny_models, dict(tiny_models["experts"])), tmp_path / "out",
              device="cuda:5")


def test_device_cpu_is_the_default_merge(tiny_models, tmp_path):
    config = config_for(tiny_models, dict(tiny_models["experts"]), "lors")
    merge(config, tmp_path / "default", diagnostics=False)
    assert main(merge_args(tiny_models, tmp_path / "cpu", "--device", "cpu",
                           "--no-diagnostics")) == 0
    default, cpu = load_state(tmp_path / "default"), load_state(tmp_path / "cpu")
    assert all(torch.equal(default[n], cpu[n]) for n in default)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,params", [("lors", {}), ("ties", {"keep": 0.3}),
                                           ("task_arithmetic", {}), ("dare_ties", {}),
                                           ("ties", {"keep": 0.3, "scope": "global"})])
def test_a_cuda_merge_equals_the_cpu_merge(tiny_models, tmp_path, method, params):
    config = config_for(tiny_models, dict(tiny_models["experts"]), method, parameters=params)
    cpu_report = merge(config, tmp_path / "cpu")
    gpu_report = merge(config, tmp_path / "gpu", device="cuda")
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    for name, expected in cpu.items():
        # rounding differs between the devices; a top-k may then keep another entry at its
        # threshold, so a few entries of a pruned matrix may differ by a residual's size
        close = torch.isclose(gpu[name], expected, rtol=1e-4, atol=1e-5)
        assert close.float().mean() >= 0.995, name
    cpu_norms = [t["task_vector_norms"] for t in cpu_report["diagnostics"]["tensors"]]
    gpu_norms = [t["task_vector_norms"] for t in gpu_report["diagnostics"]["tensors"]]
    assert torch.allclose(torch.tensor(gpu_norms), torch.tensor(cpu_norms), rtol=1e-4)
