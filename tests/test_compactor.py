"""Compactor's scores on random tensors: known leverage cases, budgets, determinism."""

from __future__ import annotations

import torch

from kvforge.methods import Budget, CompressionContext, get_method
from kvforge.methods.compactor import chunked_attention_scores, leverage_scores
from kvforge.prefill import KV


def test_duplicated_key_scores_lower_than_a_unique_direction():
    g = torch.Generator().manual_seed(0)
    T, D = 64, 16
    base = torch.randn(T, D, generator=g) * 0.1
    base[:, 0] = 0.0  # nobody points along dimension 0 ...
    unique = base.clone()
    unique[10, 0] = 5.0  # ... except token 10
    dup = base.clone()
    dup[10, 0] = 5.0
    dup[40, 0] = 5.0  # token 40 duplicates it
    lev_u = leverage_scores(unique.view(1, 1, T, D), sketch=D, chunk=T, ridge=1e-4, seed=0)[0, 0]
    lev_d = leverage_scores(dup.view(1, 1, T, D), sketch=D, chunk=T, ridge=1e-4, seed=0)[0, 0]
    assert lev_u[10] > 0.9 and lev_u[10] == lev_u.max()  # a unique direction has leverage near 1
    assert lev_d[10] < 0.6 * lev_u[10]  # sharing the direction halves it
    assert abs(float(lev_d[10] - lev_d[40])) < 0.05  # the twins share it (up to their small noise)


def test_leverage_scores_sum_to_rank_and_survive_rank_deficiency():
    T, D = 32, 8
    keys = torch.zeros(2, 3, T, D)
    keys[1, 2] = torch.randn(T, D)
    lev = leverage_scores(keys, sketch=8, chunk=16, ridge=1e-6, seed=1)
    assert torch.isfinite(lev).all()
    assert float(lev[0].abs().max()) < 1e-3  # an all-zero head: no leverage anywhere, no NaN
    # per chunk, leverage sums to about the rank of the centered sketch (<= sketch)
    assert 6.0 < float(lev[1, 2, :16].sum()) <= 8.0 + 1e-3


def test_attention_scores_follow_the_attended_key():
    L, H, G, T, D = 1, 1, 2, 8, 4
    q = torch.zeros(L, H * G, T, D)
    q[..., 0] = 10.0
    k = torch.zeros(L, H, T, D)
    k[0, 0, 5, 0] = 1.0  # every query aligns with key 5
    v = torch.ones(L, H, T, D)
    s = chunked_attention_scores(q, k, v, chunk=T, smooth=1)
    assert int(s[0, 0].argmax()) == 5


def random_kv(T=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, H, D = 2, 3, 16
    keys = torch.randn(L, H, T, D, generator=g)
    return KV(keys=keys, values=torch.randn(L, H, T, D, generator=g),
              queries=torch.randn(L, H * 3, T, D, generator=g).half(), keys_pre_rope=keys)


def test_budget_exact_ragged_and_seeded():
    kv = random_kv()
    m = get_method("compactor")
    out = m.compress(kv, Budget(0.25), CompressionContext(seed=3))
    assert out.lengths.sum(dim=1).tolist() == [round(0.25 * 3 * 300)] * 2
    assert len(set(out.lengths.flatten().tolist())) > 1
    again = m.compress(kv, Budget(0.25), CompressionContext(seed=3))
    assert all(torch.equal(a, b) for a, b in zip(out.positions, again.positions))


def test_global_scope_lets_layers_differ_at_the_same_total():
    kv = random_kv()
    kv.keys[1] *= 0.01  # make layer 1's scores flat ...
    m = get_method("compactor", scope="global")
    out = m.compress(kv, Budget(0.3), CompressionContext())
    assert out.kept == 2 * round(0.3 * 3 * 300)
    per_layer = out.lengths.sum(dim=1).tolist()
    assert per_layer[0] != per_layer[1]


def test_protected_tokens_do_not_shape_the_scores():
    kv = random_kv()
    loud = KV(keys=kv.keys.clone(), values=kv.values, queries=kv.queries, keys_pre_rope=None)
    loud.keys[:, :, :8] *= 50.0  # an attention sink / outlier keys among the protected first tokens
    loud.keys_pre_rope = loud.keys
    for exclude in (True, False):
        m = get_method("compactor", exclude_protected=exclude)
        a = m.score(kv, CompressionContext(seed=0, keep=0.5))
        b = m.score(loud, CompressionContext(seed=0, keep=0.5))
        inner = slice(m.sink, kv.shape[2] - m.recent)
        assert torch.isinf(a[:, :, : m.sink]).all() == exclude
        assert torch.allclose(a[:, :, inner], b[:, :, inner]) == exclude
