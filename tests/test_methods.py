"""One conformance matrix over every registered method, on random tensors (no model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvforge.errors import ConfigError
from kvforge.methods import Budget, CompressionContext, Compressor, available_methods, get_method
from kvforge.methods.base import _REGISTRY
from kvforge.prefill import KV


def random_kv(L=3, H=4, T=50, D=8, seed=0, group=2) -> KV:
    """Random KV with everything a method may ask for (queries, pre-RoPE keys, token surprisal)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, H, T, D, generator=g) * torch.rand(L, H, 1, 1, generator=g) * 3
    return KV(keys=keys, values=torch.randn(L, H, T, D, generator=g),
              queries=torch.randn(L, H * group, T, D, generator=g).half(),
              keys_pre_rope=keys + 0.1 * torch.randn(L, H, T, D, generator=g),
              surprisal=torch.rand(T, generator=g) * 5)


@pytest.fixture(params=sorted(n for n in _REGISTRY if not get_method(n).needs_model) + ["sculpt:init=select_fit"])
def method(request) -> Compressor:
    return get_method(request.param)


def test_model_running_methods_conform_on_a_real_prefill(tiny_llama, tiny_adapter):
    """Methods that run the model again (needs_model) get the conformance checks on a tiny model's prefill
    (distill with an adapter trained for the tiny model: the shipped one is the embedded model's)."""
    from kvforge.model import load_model
    from kvforge.prefill import prefill

    lm = load_model(tiny_llama)
    kv = prefill(lm.model, lm.encode_document("A short document about a fox and a dog. " * 12), queries=True)
    L, H, T, _ = kv.shape
    for name in sorted(n for n in _REGISTRY if get_method(n).needs_model) + ["select_fit:replay=1", "replay:grad=1",
                                                                                 "sculpt:grad=0"]:
        m = get_method(name, adapter=str(tiny_adapter)) if name == "distill" else get_method(name)
        ctx = CompressionContext(model=lm, seed=0)
        for keep in (0.5, 0.1):
            out = m.compress(kv, Budget(keep), ctx)
            assert out.kept <= max(round(keep * H * T), 12 * H) * L + L * H, (name, keep)
            assert (out.lengths >= 1).all()
            assert torch.equal(out.lengths, m.compress(kv, Budget(keep), ctx).lengths)  # deterministic
        assert Compressor.from_dict(m.to_dict()) == m
        with pytest.raises(ValueError, match="needs the model"):
            m.compress(dataclasses.replace(kv, input_ids=None), Budget(0.5), CompressionContext(model=lm))
    # sculpt from the replay's selection optimizes the entries replay keeps (the same slots, new values and beta)
    for grad in (0, 1):
        ctx = CompressionContext(model=lm, seed=0)
        sculpted = get_method("sculpt", init="replay", grad=grad).compress(kv, Budget(0.25), ctx)
        selected = get_method("replay", grad=grad).compress(kv, Budget(0.25), ctx)
        assert torch.equal(sculpted.lengths, selected.lengths) and sculpted.beta is not None
        assert all(torch.equal(a, b) for a, b in zip(sculpted.positions, selected.positions))
        assert not all(torch.equal(a, b) for a, b in zip(sculpted.values, selected.values))


def test_replay_attribution_is_attention_times_what_an_entry_writes_times_its_gradient(tiny_llama):
    """replay:grad=1 checked against each factor computed another way: ||W_O^h v|| by an explicit product,
    the gradient norms by torch.autograd.grad on the same objective, the attention from plain replay's scores."""
    from transformers import DynamicCache

    from kvforge.model import load_model
    from kvforge.prefill import REPLAY_PROMPT, _replay_with_gradient, _value_write_norms, prefill, replay_scores

    lm = load_model(tiny_llama)
    kv = prefill(lm.model, lm.encode_document("A fox, a dog and a cat sat by the river bank. " * 6))
    L, H, T, D = kv.shape
    model = lm.model
    for layer in (0, L - 1):
        w = model.model.layers[layer].self_attn.o_proj.weight.detach().float()  # (hidden, Hq * D)
        Hq = w.shape[1] // D
        explicit = torch.stack([(kv.values[layer][h // (Hq // H)].float() @ w[:, h * D:(h + 1) * D].T).norm(dim=-1)
                                for h in range(Hq)])
        assert torch.allclose(_value_write_norms(model, layer, kv.values[layer]), explicit, rtol=1e-4, atol=1e-5)
    prompt = lm.tokenizer(REPLAY_PROMPT, add_special_tokens=False)["input_ids"]
    replay = prompt + kv.input_ids

    def cache():
        c = DynamicCache(config=model.config)
        for layer in range(L):
            c.update(kv.keys[layer][None].clone(), kv.values[layer][None].clone(), layer)
        return c

    norms = _replay_with_gradient(model, cache(), replay)
    # the gradient through an independent objective: Phi computed from a second forward's layer outputs
    captured = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    final = []
    hooks.append(model.model.layers[-1].register_forward_hook(lambda m, a, o: final.append(o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(torch.tensor([replay])).detach().requires_grad_(True)
            model.model(inputs_embeds=embeds, past_key_values=cache(), use_cache=True)
            grads = torch.autograd.grad(final[0].float().square().sum(), captured)
    finally:
        for h in hooks:
            h.remove()
    for layer in range(L):
        assert torch.allclose(norms[layer], grads[layer][0].float().norm(dim=-1), rtol=1e-4, atol=1e-6)
    plain = replay_scores(model, kv, kv.input_ids, prompt, chunk=4096)
    weighted = replay_scores(model, kv, kv.input_ids, prompt, chunk=4096, attribution=True)
    assert weighted.shape == plain.shape == (L, H, T) and bool((weighted >= 0).all())
    # bounded by the largest attention times the largest factors, and not the same ranking as plain replay
    for layer in range(L):
        bound = plain[layer] * norms[layer][len(prompt):].max() * _value_write_norms(
            model, layer, kv.values[layer]).view(H, -1, T).amax(dim=1)
        assert bool((weighted[layer] <= bound * (1 + 1e-4) + 1e-9).all())
    assert not torch.equal(weighted.argsort(dim=-1), plain.argsort(dim=-1))


class TestConformance:
    """Every method: within budget, ragged layout valid, deterministic, round-trips through to_dict."""

    @pytest.mark.parametrize("keep", [1.0, 0.5, 0.25, 0.1])
    def test_within_budget_and_valid_layout(self, method, keep):
        kv = random_kv()
        L, H, T, D = kv.shape
        out = method.compress(kv, Budget(keep), CompressionContext(seed=0))
        assert out.lengths.shape == (L, H) and out.lengths.dtype == torch.int32
        assert bool((out.lengths >= 1).all()) and bool((out.lengths <= T).all())
        expect = L * H * T if method.name == "full" else None
        for layer in range(L):
            n = int(out.lengths[layer].sum())
            assert out.keys[layer].shape == (n, D) and out.values[layer].shape == (n, D)
            assert out.positions[layer].shape == (n,)
            offs = out.layer_offsets(layer)
            for h in range(H):
                pos = out.positions[layer][offs[h]:offs[h + 1]].long()
                assert bool((pos[1:] > pos[:-1]).all())
                if method.keeps_originals:  # the kept entries are the original ones at those positions
                    torch.testing.assert_close(out.keys[layer][offs[h]:offs[h + 1]], kv.keys[layer, h, pos])
                    torch.testing.assert_close(out.values[layer][offs[h]:offs[h + 1]], kv.values[layer, h, pos])
            for t in (out.keys[layer], out.values[layer]) + ((out.beta[layer],) if out.beta is not None else ()):
                assert bool(torch.isfinite(t).all())
            assert (out.beta is not None) <= method.produces_beta
        if expect is not None:
            assert out.kept == expect
        else:
            protected = H * (getattr(method, "sink", 8) + getattr(method, "recent", 8))
            assert out.kept <= L * max(round(keep * H * T), protected)

    def test_deterministic(self, method):
        kv = random_kv(seed=3)
        a = method.compress(kv, Budget(0.3), CompressionContext(seed=5))
        b = method.compress(kv, Budget(0.3), CompressionContext(seed=5))
        assert torch.equal(a.lengths, b.lengths)
        assert all(torch.equal(x, y) for x, y in zip(a.positions, b.positions))

    def test_round_trip(self, method):
        again = Compressor.from_dict(method.to_dict())
        assert again == method and again.to_dict() == method.to_dict()

    def test_listed(self, method):
        assert method.name in available_methods()


def test_knorm_gives_heads_different_budgets():
    kv = random_kv(L=2, H=4, T=200)
    out = get_method("knorm").compress(kv, Budget(0.5), CompressionContext())
    assert len(set(out.lengths[0].tolist())) > 1
    assert out.kept == 2 * round(0.5 * 4 * 200)


def test_knorm_keeps_low_norm_keys():
    kv = random_kv(L=1, H=1, T=40)
    kv.keys[0, 0, 20] *= 0.0  # the smallest possible norm
    kv.keys[0, 0, 21] *= 100.0  # a huge one
    out = get_method("knorm", sink=1, recent=1).compress(kv, Budget(0.2), CompressionContext())
    kept = set(out.positions[0].tolist())
    assert 20 in kept and 21 not in kept and 0 in kept and 39 in kept


def test_unknown_method_and_options():
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ConfigError, match="no option"):
        Compressor.from_dict({"name": "knorm", "config": {"bogus": 1}})
    with pytest.raises(ConfigError):
        Budget(0.0)
    with pytest.raises(ConfigError):
        Budget(1.5)
