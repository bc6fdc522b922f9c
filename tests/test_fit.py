"""Select+Fit, KVSculpt and pilot allocation on random tensors: fits that fit, budgets that add up, no NaN."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvforge.budget import allocate, redistribute
from kvforge.errors import ConfigError
from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.methods.fit import attend, fit_values, head_errors, match_mass, reference
from kvforge.prefill import KV


def structured_kv(L=2, H=2, T=96, D=16, group=2, seed=0) -> KV:
    """Keys in a few clusters with queries that prefer some of them: attention that compression can keep."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, D, generator=g) * 2
    keys = centers[torch.randint(0, 6, (L, H, T), generator=g)] + 0.3 * torch.randn(L, H, T, D, generator=g)
    values = torch.randn(L, H, T, D, generator=g)
    queries = (centers[torch.randint(0, 3, (L, H * group, T), generator=g)]
               + 0.5 * torch.randn(L, H * group, T, D, generator=g))
    return KV(keys=keys, values=values, queries=queries.half(), keys_pre_rope=keys.clone(),
              surprisal=torch.rand(T, generator=g) * 5)


CTX = CompressionContext(seed=0)


def _error(kv, out, samples=96) -> float:
    return float(head_errors(kv, out, reference(kv, None, samples, "own", 0)).mean())


def test_refit_lowers_the_output_error_of_the_same_selection():
    kv = structured_kv()
    evict = get_method("select_fit", refit=False, ridge=1e-3).compress(kv, Budget(0.25), CTX)
    fitted = get_method("select_fit", ridge=1e-3).compress(kv, Budget(0.25), CTX)
    assert torch.equal(evict.lengths, fitted.lengths)
    assert all(torch.equal(a, b) for a, b in zip(evict.positions, fitted.positions))
    assert _error(kv, fitted) < 0.8 * _error(kv, evict)


def test_sculpt_lowers_the_error_of_its_start_and_carries_beta():
    kv = structured_kv()
    start = get_method("sculpt", init="select_fit", steps=0, samples=96, position="own").compress(kv, Budget(0.2), CTX)
    for keys in (False, True):
        sculpt = get_method("sculpt", init="select_fit", steps=20, samples=96, position="own", keys=keys).compress(kv, Budget(0.2), CTX)
        assert sculpt.beta is not None and torch.equal(start.lengths, sculpt.lengths)
        assert _error(kv, sculpt) < _error(kv, start)
        assert all(torch.equal(a, b) for a, b in zip(sculpt.keys, start.keys)) != keys  # keys move only if asked
        again = get_method("sculpt", init="select_fit", steps=20, samples=96, position="own", keys=keys).compress(kv, Budget(0.2), CTX)
        assert all(torch.equal(a, b) for a, b in zip(sculpt.values, again.values))  # deterministic


def test_match_mass_gives_a_kept_entry_the_mass_of_its_dropped_copies():
    # a full cache of 5 distinct keys, key i cached 1 + i times: keeping one copy of each, the mass of any query is
    # matched exactly by weights 1..5, so beta = log(1 + i)
    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(5, 8, generator=g), torch.randn(64, 8, generator=g)
    copies = torch.arange(1, 6).float()
    logits = queries @ keys.T * 0.5  # (M, 5)
    beta = match_mass(logits, torch.logsumexp(logits + copies.log(), dim=-1))
    torch.testing.assert_close(beta, copies.log(), atol=0.02, rtol=0)
    # nothing dropped: every weight stays 1
    torch.testing.assert_close(match_mass(logits, torch.logsumexp(logits, dim=-1)), torch.zeros(5), atol=0.01, rtol=0)


def test_matched_beta_lowers_the_error_of_a_selection():
    from kvforge.methods.select_fit import matched_beta, refit_values

    kv = structured_kv()
    ref = reference(kv, None, 96, "own", 0)
    plain = refit_values(kv, get_method("select_fit", refit=False).compress(kv, Budget(0.2), CTX), ref, 0.1)
    start = dataclasses.replace(plain, beta=matched_beta(kv, plain, ref))
    assert [len(b) for b in start.beta] == [int(n.sum()) for n in start.lengths]
    fitted = refit_values(kv, start, ref, 0.1)  # values fitted under the matched beta
    assert _error(kv, fitted) < 0.8 * _error(kv, plain)


def test_fit_values_handles_rank_deficient_systems():
    probs = torch.zeros(8, 4)
    probs[:, 0] = probs[:, 1] = 0.5  # two identical columns, two columns no query attends to
    target = torch.randn(8, 3)
    v0 = torch.randn(4, 3)
    out = fit_values(probs, target, v0, ridge=1e-6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2:], v0[2:], atol=1e-4, rtol=0)  # unattended entries keep their values
    # duplicates share the correction evenly, and together they fit the (least-squares) target
    torch.testing.assert_close(out[0] - v0[0], out[1] - v0[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(0.5 * (out[0] + out[1]), target.mean(0), atol=1e-3, rtol=0)
    out = fit_values(torch.zeros(8, 4), target, v0, ridge=0.0)  # all-zero system: the fallback
    assert torch.isfinite(out).all()
    g = torch.Generator().manual_seed(2)
    twins = torch.softmax(torch.randn(1, 8, generator=g).repeat(4, 1), dim=-1)  # dual form, four identical queries
    out = fit_values(twins, torch.randn(4, 4, generator=g), torch.randn(8, 4, generator=g), ridge=0.0)  # singular
    assert torch.isfinite(out).all()


def test_reference_targets_are_computed_once_per_cache():
    kv, other = structured_kv(seed=0), structured_kv(seed=1)
    ref = reference(kv, samples=32, position="own")
    first = ref.targets(kv, 1)
    assert all(a is b for a, b in zip(first, ref.targets(kv, 1)))  # the same cache: reused
    again = ref.targets(other, 1)  # another cache: recomputed, not served stale
    want = attend(ref.queries[1], other.keys[1].float(), other.values[1].float(), ref.scale)
    for got, exp in zip(again, want):
        torch.testing.assert_close(got, exp)
    assert not torch.allclose(first[0], again[0])


def test_attend_without_autograd_matches_the_differentiable_path():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 8, generator=g), torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g))
    beta, valid = torch.randn(2, 7, generator=g), torch.rand(2, 7, generator=g) > 0.3
    with torch.no_grad():
        fast = attend(q, k, v, 0.3, beta, valid)  # in-place weights
    slow = attend(q, k, v, 0.3, beta.clone().requires_grad_(), valid)
    for x, y in zip(fast, slow):
        torch.testing.assert_close(x, y.detach(), atol=1e-6, rtol=1e-5)
    assert slow[0].requires_grad


@pytest.mark.parametrize("queries, kept", [(50, 200), (200, 50), (64, 64)])
def test_fit_values_primal_and_dual_forms_give_the_ridge_solution(queries, kept):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(3 * torch.randn(queries, kept, generator=g), dim=-1)
    target, v0 = torch.randn(queries, 8, generator=g), torch.randn(kept, 8, generator=g)
    a = probs.double()
    lam = 0.1 * float((a.T @ a).diagonal().mean())
    want = torch.linalg.solve(a.T @ a + lam * torch.eye(kept, dtype=torch.float64),
                              a.T @ target.double() + lam * v0.double())
    # float32 Gram products: well inside the float16 the artifact stores values in (about 1e-3 here)
    torch.testing.assert_close(fit_values(probs, target, v0, 0.1), want.float(), atol=2e-4, rtol=0)


def test_select_fit_scores_by_blocks_and_blends_the_compactor():
    kv = structured_kv()
    one = get_method("select_fit", query_block=10_000, score_dtype="float32").score(kv, CTX)
    blocks = get_method("select_fit", query_block=7, score_dtype="float32").score(kv, CTX)
    torch.testing.assert_close(one, blocks, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.sum(dim=2), torch.ones(2, 2), atol=1e-5, rtol=0)  # a softmax mean per head
    plain, blended = get_method("select_fit"), get_method("select_fit", blend=1.0)
    assert not plain.needs_pre_rope_keys and blended.needs_pre_rope_keys
    a, b = plain.compress(kv, Budget(0.2), CTX), blended.compress(kv, Budget(0.2), CTX)
    assert a.kept == b.kept  # the same budget ...
    assert any(not torch.equal(x, y) for x, y in zip(a.positions, b.positions))  # ... spent elsewhere
    assert all(torch.isfinite(v).all() for v in b.values)


def test_select_fit_bfloat16_scores_match_float32():
    kv = structured_kv()
    fast = get_method("select_fit").score(kv, CTX)  # bfloat16 scoring, the default
    exact = get_method("select_fit", score_dtype="float32").score(kv, CTX)
    torch.testing.assert_close(fast, exact, atol=2e-3, rtol=0.02)
    torch.testing.assert_close(fast.sum(dim=2), torch.ones(2, 2), atol=0.01, rtol=0)  # still a softmax mean
    with pytest.raises(ConfigError):
        get_method("select_fit", score_dtype="float16")


@pytest.mark.parametrize("name", ["select_fit", "sculpt"])
@pytest.mark.parametrize("case", ["zero_head", "one_token", "keep_near_1", "fp16"])
def test_numerical_robustness(name, case):
    kv = structured_kv(T=48)
    keep = 0.3
    if case == "zero_head":
        kv.keys[0, 1] = 0
        kv.values[0, 1] = 0
    elif case == "one_token":
        keep = 0.001
    elif case == "keep_near_1":
        keep = 0.999
    elif case == "fp16":
        kv = KV(keys=kv.keys.half(), values=kv.values.half(), queries=kv.queries, keys_pre_rope=kv.keys_pre_rope.half(),
                surprisal=kv.surprisal.half())
    config = {"init": "select_fit", "steps": 6, "samples": 48, "position": "own"} if name == "sculpt" else {"samples": 48}
    out = get_method(name, **config).compress(kv, Budget(keep), CTX)
    for layer in range(len(out.keys)):
        for t in (out.keys[layer], out.values[layer]) + ((out.beta[layer],) if out.beta is not None else ()):
            assert bool(torch.isfinite(t.float()).all()), (case, layer)
    assert bool((out.lengths >= 1).all())
    if case == "zero_head":  # an all-zero head is represented by zeros, not by garbage
        a, b = out.layer_offsets(0)[1:3]
        assert float(out.values[0][a:b].abs().max()) < 1e-3


def test_redistribute_is_exact_bounded_and_follows_difficulty():
    difficulty = torch.tensor([[1.0, 100.0, 0.0], [4.0, 4.0, 1e6]])
    counts = redistribute(difficulty, total=60, floor=2, cap=40)
    assert int(counts.sum()) == 60 and bool((counts >= 2).all()) and bool((counts <= 40).all())
    assert counts[0, 1] > counts[0, 0] >= counts[0, 2] and int(counts[1, 2]) == 40  # the hardest hits the cap
    assert int(redistribute(torch.ones(2, 2), total=10_000, floor=1, cap=5).sum()) == 20  # capped total


def test_pilot_allocation_keeps_the_total_and_moves_budget_to_hard_heads():
    kv = structured_kv(L=3, H=2, T=64)
    # make one head much harder: values that vary wildly across tokens it attends to
    kv.values[1, 0] *= 10
    method = get_method("select_fit", samples=64, position="own")
    budget, alloc = allocate(kv, method, 0.25, CTX)
    counts = torch.tensor(budget.head_totals)
    assert int(counts.sum()) == alloc.uniform * 3 * 2
    out = method.compress(kv, budget, CTX)
    assert torch.equal(out.lengths.long(), counts)
    assert alloc.to_dict()["head_totals"] == budget.head_totals
    # a caller's prepared scores give the pilot the same answer without scoring again
    calls = []
    prepared = method.prepare(kv, CTX)
    again, _ = allocate(kv, method, 0.25, CTX, compress_at=lambda b: calls.append(b) or prepared(b))
    assert again.head_totals == budget.head_totals and len(calls) == 1


def test_per_head_budget_is_exact_for_scored_methods():
    kv = structured_kv(L=2, H=2, T=64)
    budget = Budget(keep=0.25, head_totals=[[10, 22], [30, 6]])
    for name in ("compactor", "knorm", "select_fit"):
        method = get_method(name, sink=2, recent=2)
        out = method.compress(kv, budget, CTX)
        assert out.lengths.tolist() == [[10, 22], [30, 6]], name


def test_reference_rotates_queries_to_the_end_with_a_model(tiny_llama):
    from kvforge.model import load_model
    from kvforge.prefill import prefill

    lm = load_model(str(tiny_llama))
    ids = lm.encode_document("The quick brown fox jumps over the lazy dog. " * 8)
    kv = prefill(lm.model, ids, queries=True)
    own = reference(kv, lm.model, 16, "own", 0)
    end = reference(kv, lm.model, 16, "end", 0)
    # a rotation: norms are kept, directions change (except for queries already at the end)
    torch.testing.assert_close(own.queries[0].norm(dim=-1), end.queries[0].norm(dim=-1), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(own.queries[0], end.queries[0])
    # an end-rotated query of position t against key s scores like the original query at T against it
    T = kv.shape[2]
    assert own.scale == end.scale == lm.model.model.layers[0].self_attn.scaling
    assert T > 16


def test_build_sculpt_with_pilot_allocation_end_to_end(tmp_path, docs, tiny_llama):
    """The Python API takes the command line's options; beta and the allocation reach the artifact."""
    import kvforge
    from kvforge import artifact

    report = kvforge.build(docs, tmp_path / "lib", method="sculpt:init=select_fit", keep=0.25, allocate="pilot",
                           model=str(tiny_llama), progress=False)
    assert sorted(report.built) == ["assert", "del", "pass"]
    art = artifact.read(tmp_path / "lib" / "assert.kv")
    assert art.manifest["storage"]["has_beta"] and art.kv.beta is not None
    alloc = art.manifest["compression"]["extra"]["allocation"]
    assert alloc["rule"] == "sqrt" and alloc["pilot"] == "select_fit"  # the selection sculpt starts from
    assert art.kv.lengths.tolist() == alloc["head_totals"]
    doc = kvforge.load(tmp_path / "lib" / "assert.kv", model=str(tiny_llama))
    assert torch.isfinite(doc.logits("What does assert do?", "It checks")).all()
    from click.testing import CliRunner

    from kvforge.cli import cli

    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "lib" / "assert.kv")]).output
    assert "allocate  pilot (select_fit" in shown and "beta yes" in shown


def test_eval_compares_uniform_and_pilot_allocation(tmp_path, tiny_llama):
    import json

    from click.testing import CliRunner

    from kvforge.cli import cli

    r = CliRunner().invoke(cli, ["eval", "--methods", "select_fit", "--keep", "0.25", "--allocate", "uniform,pilot",
                                 "--tasks", "niah_number", "--lengths", "256", "--samples", "1", "--model",
                                 str(tiny_llama), "--out", str(tmp_path / "ev"), "--no-progress", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert {(x["method"], x["allocate"]) for x in rows} == {("full", "uniform"), ("select_fit", "uniform"),
                                                          ("select_fit+pilot", "pilot")}


def test_sculpt_buckets_heads_of_similar_counts():
    from kvforge.methods.sculpt import buckets

    assert buckets([10, 100, 12, 0, 140]) == [[0, 2], [1, 4]]  # the empty head has nothing to optimize
    assert buckets([5, 5, 5]) == [[0, 1, 2]]
    assert buckets([1, 2, 4, 8]) == [[0], [1], [2], [3]]
    assert buckets([]) == []


def test_method_specs_carry_options():
    from kvforge.errors import ConfigError

    m = get_method("sculpt:init=compactor:steps=3:keys=true")
    assert (m.init, m.steps, m.keys, m.blend) == ("compactor", 3, True, 1.0)
    assert get_method("select_fit:blend=0.5").to_dict()["config"]["blend"] == 0.5
    for bad in ("sculpt:steps", "sculpt:nope=1", "sculpt:init=random", "nope:x=1", "select_fit:query_block=0",
                "select_fit:blend=-1", "sculpt:blend=-1", "sculpt:init=replay:grad=2"):
        with pytest.raises(ConfigError):
            get_method(bad)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen"])
def test_prefill_surprisal_is_the_models_next_token_loss(fixture, request):
    """Each token's -log p under the model, from the final hidden states, as the full logits give it."""
    from kvforge.model import load_model
    from kvforge.prefill import prefill

    lm = load_model(str(request.getfixturevalue(fixture)))
    ids = lm.encode_document("The quick brown fox jumps over the lazy dog. " * 30)
    kv = prefill(lm.model, ids, queries=True, surprisal=True)
    assert kv.surprisal.shape == (len(ids),) and kv.surprisal.dtype == torch.float32 and kv.surprisal[0] == 0
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = -torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    # the output head runs in bfloat16 (a ranking prior): within a few hundredths of a nat of float32
    torch.testing.assert_close(kv.surprisal[1:], want, atol=0.1, rtol=0.02)
    assert prefill(lm.model, ids).surprisal is None  # only on request: it costs an output head per token
    # chunked: a chunk boundary anywhere gives the same values
    from kvforge.prefill import token_surprisal

    hidden = torch.randn(37, lm.model.config.hidden_size)
    tok = torch.randint(0, lm.model.config.vocab_size, (37,))
    torch.testing.assert_close(token_surprisal(lm.model, hidden, tok, chunk=5),
                               token_surprisal(lm.model, hidden, tok, chunk=512))


def test_surprisal_prior_is_smoothed_and_z_scored():
    from kvforge.methods.select_fit import surprisal_prior

    T = 40
    s = torch.full((T,), 1.0)
    s[0] = 0.0  # no prediction for the first token
    s[20] = 11.0  # one surprising token
    kv = KV(keys=torch.zeros(1, 1, T, 4), values=torch.zeros(1, 1, T, 4), surprisal=s)
    p = surprisal_prior(kv, 5)
    assert p.shape == (T,) and abs(float(p.mean())) < 1e-5 and abs(float(p.std()) - 1) < 1e-4
    assert torch.allclose(p[18:23], p[20].expand(5))  # the window spreads it over its neighbours ...
    assert bool((p[18:23] > p[23:].max()).all()) and torch.allclose(p[:17], p[1].expand(17))  # ... and no further
    assert int(surprisal_prior(kv, 1).argmax()) == 20
    assert torch.isfinite(surprisal_prior(KV(keys=torch.zeros(1, 1, 1, 4), values=torch.zeros(1, 1, 1, 4),
                                             surprisal=torch.zeros(1)), 5)).all()
    with pytest.raises(ValueError, match="surprisal=True"):
        surprisal_prior(KV(keys=torch.zeros(1, 1, T, 4), values=torch.zeros(1, 1, T, 4)), 5)


def test_select_fit_and_sculpt_keep_a_surprising_span_with_the_prior():
    kv = structured_kv(T=96)
    surprisal = torch.ones(96)
    surprisal[50:53] = 12.0  # a three-token "number" the document's own queries do not look at
    kv.surprisal = surprisal
    for name in ("select_fit", "sculpt"):
        init = {"init": "select_fit"} if name == "sculpt" else {}
        plain = get_method(name, samples=96, position="own", surprisal=0.0, **init)
        prior = get_method(name, samples=96, position="own", surprisal=2.0, **init)
        assert prior.needs_surprisal and not plain.needs_surprisal
        budget = Budget(0.25)  # 24 entries per head, 12 of them the protected sink and recent tokens

        def span_kept(out):
            return sum(int(((p >= 50) & (p < 53)).sum()) for p in out.positions)

        a, b = plain.compress(kv, budget, CTX), prior.compress(kv, budget, CTX)
        assert a.kept == b.kept  # the same budget
        assert span_kept(b) == 3 * 2 * 2 > span_kept(a), name  # every layer and head keeps the whole span
    with pytest.raises(ConfigError):
        get_method("select_fit", surprisal=-1)
    with pytest.raises(ConfigError):
        get_method("sculpt", surprisal=-0.5)


@pytest.mark.parametrize("spec", ["select_fit:samples=64:position=own",
                                  "sculpt:init=select_fit:samples=64:position=own:steps=2:surprisal=0"])
def test_pilot_shares_the_prepared_selection_and_reference_with_the_same_result(spec, monkeypatch):
    from kvforge.methods import fit

    kv = structured_kv(L=3, H=2, T=64)
    kv.values[1, 0] *= 10
    method = get_method(spec)
    alone, _ = allocate(kv, method, 0.25, CTX)  # the pilot compresses and samples its reference on its own
    prepared = method.prepare(kv, CTX)
    assert prepared.reference is not None
    drawn = []
    monkeypatch.setattr("kvforge.budget.reference", lambda *a, **k: drawn.append(a) or fit.reference(*a, **k))
    shared, _ = allocate(kv, method, 0.25, CTX, compress_at=prepared)
    assert shared.head_totals == alone.head_totals and drawn == []  # no second reference sample
    assert torch.equal(prepared(shared).lengths.long(), torch.tensor(shared.head_totals))
