"""The dev search (TaskVectors) keeps the base and no expert's task vectors: memory is one
model plus one tensor per expert, not one model per expert, with the merges it scored when
it held them all (and ``lors merge``'s: tests/test_experiment.py)."""

from __future__ import annotations

import shutil
import weakref

import pytest
import torch

from conftest import load_state
from lors.merging import core, merge, validate_config
from lors.merging import primitives as P
from lors.merging.engine import one_torch_thread, worker_pool

POINTS = [("task_arithmetic", {}), ("ties", {"keep": 0.3}), ("lors", {"rank": 2, "keep": 0.3}),
          ("lors", {"rank": 3, "keep": 0.2, "svd": "exact"}), ("dare", {"keep": 0.6, "seed": 3}),
          ("dare_ties", {"keep": 0.6}), ("ties", {"keep": 0.3, "scope": "global"}),
          ("magnitude", {"keep": 0.3}), ("tsv", {}), ("iso_c", {}), ("cart", {"rank": 2}),
          ("lors_centred", {"rank": 2, "keep": 0.3}), ("svc", {}), ("average", {})]


def experts_of(tiny_models) -> dict[str, str]:
    return {n: str(p) for n, p in tiny_models["experts"].items()}


@pytest.fixture
def vectors(tiny_models):
    from lors.experiment.taskvectors import TaskVectors
    return TaskVectors(str(tiny_models["base"]), experts_of(tiny_models))


def tensor_bytes(root) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through dicts, lists,
    tuples, sets and objects' attributes."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend([*obj.keys(), *obj.values()])
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.extend(vars(obj).values())
    return sum(storages.values())


def test_the_search_holds_the_base_and_small_svd_factors_only(vectors):
    base = tensor_bytes(vectors.base)
    assert tensor_bytes(vectors) == base  # no task vector read ahead
    for method, params in POINTS:
        vectors.state(vectors.delta(method, params), 0.5)
    assert tensor_bytes(vectors) == base + tensor_bytes(vectors.svd_cache)
    merged = [n for n in vectors.taus]
    one_model_of_taus = sum(vectors.base[n].numel() * 4 for n in merged)
    assert base >= one_model_of_taus  # (the base is one model)
    cached = 0
    for u, s, vh in vectors.svd_cache.values():  # rank-r factors in memory of their own
        rank = s.numel()
        assert (u.shape[1], vh.shape[0]) == (rank, rank)
        for tensor in (u, s, vh):
            assert tensor.untyped_storage().nbytes() == tensor.nbytes
        cached += (u.numel() + s.numel() + vh.numel()) * 4
    assert cached == tensor_bytes(vectors.svd_cache)


@pytest.mark.parametrize("method,params", POINTS)
def test_at_most_one_tensor_per_expert_is_alive(vectors, monkeypatch, method, params):
    """Every task vector the search reads (merge, global thresholds, calibration, cosines)
    is freed before the next tensor's are read: never more than one tensor per expert (and
    one more while a loop lets go of its last)."""
    live, peak = [0], [0]
    original = core.task_vectors

    def counted(*args, **kwargs):
        taus = original(*args, **kwargs)
        for tau in taus:
            live[0] += 1
            weakref.finalize(tau, lambda: live.__setitem__(0, live[0] - 1))
        peak[0] = max(peak[0], live[0])
        return taus
    monkeypatch.setattr(core, "task_vectors", counted)
    experts = len(vectors.names)
    vectors.state(vectors.delta(method, params), 0.7)
    vectors.cosines()
    assert experts <= peak[0] <= experts + 1
    assert live[0] == 0


def dense_state(tiny_models, method, params, lam):
    """The search as it was: every task vector read once and held, merged from memory (in
    one torch thread with the experts pruned on a pool, as the engine and now the search)."""
    from lors.experiment.taskvectors import TaskVectors
    vectors = TaskVectors(str(tiny_models["base"]), experts_of(tiny_models))
    held = {name: vectors.taus[name] for name in vectors.taus}
    weights = [1.0] * len(held[next(iter(held))])
    from lors.merging.config import resolve_method
    _, resolved, group_ops = resolve_method(method, params, {}, weights)
    entries, _ = core.plan_entries(vectors.meta, group_ops, resolved)
    state = dict(vectors.base)
    with worker_pool(2) as pool:
        thresholds = core.global_thresholds(entries, resolved, len(weights), held.__getitem__)
        for entry in entries:
            if entry.op == core.COPY:
                continue
            combination, _ = core.combine(entry, held[entry.name], weights, resolved,
                                          thresholds=thresholds, map=pool.map, svd_cache={},
                                          known=vectors.known[entry.name])
            params_lam = {**resolved, "lambda": lam if lam is not None else resolved["lambda"]}
            with one_torch_thread():
                delta = core.finish(entry, combination, core.lambda_for(entry, params_lam),
                                    held[entry.name], weights, params_lam)
            state[entry.name] = vectors.base[entry.name] + delta
    return state


@pytest.mark.parametrize("method,params", POINTS)
def test_reading_on_demand_scores_the_merges_it_scored_from_memory(tiny_models, vectors,
                                                                   method, params):
    lam = None if method == "average" else 0.6
    state = vectors.state(vectors.delta(method, params), lam)
    reference = dense_state(tiny_models, method, params, lam)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_the_search_combines_in_one_torch_thread_and_restores_the_count(vectors, monkeypatch):
    threads = []
    original = core.combine
    monkeypatch.setattr(core, "combine", lambda *a, **k: threads.append(
        torch.get_num_threads()) or original(*a, **k))
    before = torch.get_num_threads()
    vectors.state(vectors.delta("svc", {}), 0.5)
    assert set(threads) == {1}
    assert torch.get_num_threads() == before


def test_a_pickled_expert_reads_the_same_task_vector_every_time(tiny_models, tmp_path):
    """Callers subtract the base in place: a loaded (pytorch_model.bin) checkpoint gives a
    copy per read, so a search's re-reads and global thresholds' two passes see the stored
    weights, not a task vector subtracted twice."""
    from lors.checkpoint.reader import open_checkpoint
    expert = tiny_models["experts"]["e1"]
    pickled = tmp_path / "e1"
    pickled.mkdir()
    shutil.copy(expert / "config.json", pickled / "config.json")
    torch.save(load_state(expert), pickled / "pytorch_model.bin")
    checkpoint = open_checkpoint(str(pickled))
    name = "model.encoder.layers.0.fc1.weight"
    base = core.read_float(open_checkpoint(str(tiny_models["base"])), "base", name)
    first = core.task_vectors({"e1": checkpoint}, name, base)[0]
    assert torch.equal(core.task_vectors({"e1": checkpoint}, name, base)[0], first)
    experts = experts_of(tiny_models)
    outputs = {}
    for label, path in (("safetensors", experts["e1"]), ("pickled", str(pickled))):
        config = validate_config({"base": str(tiny_models["base"]), "method": "ties",
                                  "parameters": {"keep": 0.3, "scope": "global"},
                                  "experts": [{"name": "e0", "path": experts["e0"]},
                                              {"name": "e1", "path": path}]})
        merge(config, tmp_path / label, diagnostics=False)
        outputs[label] = load_state(tmp_path / label)
    for name, tensor in outputs["safetensors"].items():
        torch.testing.assert_close(outputs["pickled"][name], tensor, rtol=0, atol=0)


def test_the_lean_disjoint_mean_is_the_stacked_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(5, 40, 30, generator=g)
    stacked[1] *= torch.rand(40, 30, generator=g) > 0.5  # pruned entries
    stacked[2, 0, :6] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"),
                                      1e-45])
    bits = stacked.view(torch.int32).clone()
    for sign in (P.elect_sign(stacked), torch.ones(40, 30), -torch.ones(40, 30)):
        agrees = torch.sign(stacked) == sign
        expected = (stacked * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)
        for result in (P.disjoint_mean(stacked, sign),
                       P.disjoint_mean(stacked.clone(), sign, inplace=True)):
            assert torch.equal(result.view(torch.int32), expected.view(torch.int32))
        assert torch.equal(stacked.view(torch.int32), bits)  # not in place: unchanged
    assert P.disjoint_mean(torch.tensor([[1.0, -2.0, 0.0], [2.0, -3.0, 0.0]]),
                           torch.tensor([1.0, -1.0, 1.0])).tolist() == [1.5, -2.5, 0.0]


def test_cosines_are_those_of_the_whole_task_vectors(vectors):
    count = len(vectors.names)
    gram = torch.zeros(count, count, dtype=torch.float64)
    for name in vectors.taus:  # as the search that held every task vector computed them
        flat = torch.stack([t.reshape(-1) for t in vectors.taus[name]]).double()
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    expected = (gram / norms[:, None] / norms[None, :]).tolist()
    for chunk in (1 << 20, 1000, 7):  # in float64 blocks of columns: the same to rounding
        cosines = vectors.cosines(chunk)
        for row, want in zip(cosines, expected):
            assert row == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert all(cosines[i][i] == pytest.approx(1.0) for i in range(count))
