"""The only place that runs the model over a document.

Returns the full KV cache of the document segment (template prefix + text) as
dense tensors, the input to every compression method, and on request what
query-aware scorers need: the post-RoPE queries and the pre-RoPE keys, and
each token's surprisal under the model (a prior for what questions ask about).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch

from .architectures import capture_pre_rope_keys, kv_shape, layout_of
from .attention import attention_name, attention_names, text_attention
from .errors import ResourceLimitError

# Tokens left free after a document for the question and the answer.
QUESTION_RESERVE = 256
CAPTURE_ATTN = "kvforge_capture"


@dataclass
class KV:
    """A dense KV cache of one document.

    keys:          (layers, kv_heads, tokens, head_dim), post-RoPE, as the model caches them
    values:        (layers, kv_heads, tokens, head_dim)
    queries:       None or (layers, q_heads, tokens, head_dim), post-RoPE, float16
    keys_pre_rope: None or (layers, kv_heads, tokens, head_dim), the keys RoPE rotates (k_proj, or k_norm
                   after it, or qkv_proj's key slice: kvforge.architectures)
    All on the CPU in float32 (queries float16), whatever device and compute dtype the model ran in.
    surprisal:     None or (tokens,), float32: -log p(token | the tokens before it) in nats; 0 for the first
    input_ids:     None or the document's token ids (tokens,), for methods that run the model again
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None
    keys_pre_rope: torch.Tensor | None = None
    surprisal: torch.Tensor | None = None
    input_ids: list[int] | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.keys.shape)  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]


def check_length(n_tokens: int, max_context: int, where: str) -> None:
    """Refuse a document that leaves no room for a question in the model's context."""
    limit = max_context - QUESTION_RESERVE
    if n_tokens > limit:
        raise ResourceLimitError(
            f"{where}: {n_tokens} tokens is longer than this model allows for one document "
            f"({limit} = context {max_context} - {QUESTION_RESERVE} reserved for the question); "
            "kvforge refuses rather than truncating: split the document into smaller files"
        )


_captured: list | None = None


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    """SDPA attention that also records the post-RoPE queries of the current prefill."""
    if _captured is not None:
        _captured.append(query[0].to(torch.float16))
    return text_attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def _register_capture() -> None:
    from transformers.masking_utils import eager_mask, sdpa_mask

    attention_names(CAPTURE_ATTN, _capture_attention, sdpa_mask, eager_mask)


def token_surprisal(model, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """-log p(x_t | x_<t) for every token from the final hidden states; (T,) float32, 0 at t = 0.

    hidden: (T, d), the output of the model's final norm; input_ids: (T,).
    The output head runs ``chunk`` positions at a time in bfloat16: the (chunk, vocab) logits
    stay small for any vocabulary, and a ranking prior needs no more precision.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    weight = head.weight.to(torch.bfloat16)
    bias = head.bias.to(torch.bfloat16) if getattr(head, "bias", None) is not None else None
    T = hidden.shape[0]
    out = torch.zeros(T, device=hidden.device)
    for a in range(0, T - 1, chunk):
        b = min(a + chunk, T - 1)  # position t predicts token t + 1
        logits = torch.nn.functional.linear(hidden[a:b].to(torch.bfloat16), weight, bias).float()  # (c, V)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        nxt = input_ids[a + 1:b + 1]
        out[a + 1:b + 1] = torch.logsumexp(logits, dim=-1) - logits.gather(1, nxt[:, None])[:, 0]
    return out.cpu()


@torch.inference_mode()
def prefill(model, input_ids: list[int], *, queries: bool = False, pre_rope_keys: bool = False,
            surprisal: bool = False) -> KV:
    """Run ``model`` over ``input_ids`` (one sequence) and return its full KV cache.

    queries:       also return the post-RoPE queries of every layer (float16)
    pre_rope_keys: also return the keys before RoPE (the model's key module: kvforge.architectures)
    surprisal:     also return every token's surprisal (:func:`token_surprisal`)
    """
    global _captured
    from transformers import DynamicCache

    ids = torch.tensor([input_ids], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)
    cache = DynamicCache(config=model.config)
    final: list[torch.Tensor] = []
    pre_keys: list[torch.Tensor] = []
    saved_attn = model.config._attn_implementation
    with ExitStack() as stack:
        if pre_rope_keys:
            pre_keys = stack.enter_context(capture_pre_rope_keys(model, layout_of(model), *kv_shape(model.config)))
        if surprisal:
            stack.callback(model.model.norm.register_forward_hook(
                lambda mod, inp, out: final.append(out[0])).remove)
        try:
            if queries:
                _register_capture()
                model.set_attn_implementation(attention_name(model, CAPTURE_ATTN))
                _captured = []
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            q = torch.stack(_captured).cpu() if queries else None  # (L, Hq, T, D)
        finally:
            _captured = None
            if model.config._attn_implementation != saved_attn:
                model.set_attn_implementation(saved_attn)
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).float().cpu()  # (L, H, T, D)
    values = torch.stack([layer.values[0] for layer in cache.layers]).float().cpu()
    kpre = torch.stack(pre_keys).float().cpu() if pre_rope_keys else None  # (L, H, T, D)
    surp = token_surprisal(model, final[0], ids[0]) if surprisal else None
    return KV(keys=keys, values=values, queries=q, keys_pre_rope=kpre, surprisal=surp, input_ids=list(input_ids))


def attention_scale(model, head_dim: int) -> float:
    """The model's attention logit scale (its attention module's ``scaling``; else 1 / sqrt(head_dim))."""
    return float(getattr(model.model.layers[0].self_attn, "scaling", head_dim ** -0.5))


REPLAY_PROMPT = "\n\nRepeat the previous context exactly.\n"


@torch.inference_mode()
def replay_scores(model, kv: KV, input_ids: list[int], prompt_ids: list[int], chunk: int = 512,
                  attribution: bool = False) -> torch.Tensor:
    """How much the model attends to each cached entry while it repeats the document: (L, H, T) float32.

    The document's cache ``kv`` (T tokens of ``input_ids``) is extended by ``prompt_ids`` (an
    instruction to repeat) and a chunk of the document's own tokens, at positions T, T + 1, ...;
    every replayed token's post-RoPE query attends, causally, over the T cached keys and the
    replay's own; an entry's score is the largest attention weight any replayed token of any
    query head of its group gives it (the context-reconstruction signal of KVzip, Kim et al. 2025).
    A question-agnostic probe of which entries the model needs to reproduce the document.
    Chunks of ``chunk`` tokens are replayed one at a time over the document's cache alone.

    ``attribution``: weight each replayed token's attention by what the entry writes and how much it
    matters downstream (input x gradient, the signal of kvpress's KVgradPress): the score becomes
    max over replayed tokens p of A[p, c] * ||W_O^h v_c|| * ||d Phi / d a_p||, where a_p is the
    layer's attention output at p and Phi = sum_p ||h_p||^2 over the last layer's hidden states.
    One backward pass per chunk (the model's weights stay frozen).
    """
    global _captured
    from transformers import DynamicCache

    L, H, T, D = kv.keys.shape
    weights0 = next(model.parameters())
    device, dtype = weights0.device, weights0.dtype  # kv is float32 on the CPU; the replay runs where the model is
    scale = attention_scale(model, D)
    scores = torch.zeros(L, H, T)
    saved_attn = model.config._attn_implementation
    _register_capture()
    model.set_attn_implementation(attention_name(model, CAPTURE_ATTN))
    try:
        for a in range(0, T, chunk):
            replay = prompt_ids + input_ids[a:a + chunk]
            n, skip = len(replay), len(prompt_ids)
            cache = DynamicCache(config=model.config)
            for layer in range(L):
                keys, values = (t[layer][None].to(device, dtype) for t in (kv.keys, kv.values))
                if attribution:  # copies made outside inference mode: inference tensors cannot enter a backward graph
                    with torch.inference_mode(False):
                        keys, values = keys.clone(), values.clone()
                cache.update(keys, values, layer)
            _captured = []
            if attribution:
                grad_norms = _replay_with_gradient(model, cache, replay)  # L x (n,)
            else:
                model(input_ids=torch.tensor([replay], device=device), past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
            queries, _captured = _captured, None
            causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()[skip:]  # (c, n): rows over replay keys
            for layer in range(L):
                q = queries[layer][:, skip:].detach().float()  # (Hq, c, D)
                k_all = cache.layers[layer].keys[0].detach().float()  # (H, T + n, D)
                group = q.shape[0] // H
                k_all = k_all.repeat_interleave(group, dim=0)  # (Hq, T + n, D)
                logits = torch.einsum("hcd,hnd->hcn", q, k_all) * scale  # (Hq, c, T + n)
                logits[:, :, T:].masked_fill_(~causal, float("-inf"))
                weights = torch.softmax(logits, dim=-1)[:, :, :T]  # (Hq, c, T)
                if attribution:
                    weights = weights * grad_norms[layer][skip:, None]  # (Hq, c, T) x (c, 1)
                    best = weights.amax(dim=1).cpu() * _value_write_norms(model, layer, kv.values[layer])  # (Hq, T)
                    best = best.view(H, group, T).amax(dim=1)
                else:
                    best = weights.amax(dim=1).view(H, group, T).amax(dim=1).cpu()  # (H, T)
                scores[layer] = torch.maximum(scores[layer], best)
    finally:
        _captured = None
        if model.config._attn_implementation != saved_attn:
            model.set_attn_implementation(saved_attn)
    return scores


def _replay_with_gradient(model, cache, replay: list[int]) -> list[torch.Tensor]:
    """Run ``replay`` over ``cache`` with autograd on the activations; per layer, (n,) float32: the norm of
    d Phi / d (the layer's attention output) at each replayed position, Phi = sum ||last hidden state||^2."""
    layers = model.model.layers
    outputs: list = [None] * len(layers)
    last: list = [None]

    def keep_attention(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            outputs[i] = out
        return hook

    def keep_last(module, args, output):
        last[0] = output[0] if isinstance(output, tuple) else output

    frozen = [p for p in model.parameters() if p.requires_grad]
    hooks = [layer.self_attn.register_forward_hook(keep_attention(i)) for i, layer in enumerate(layers)]
    hooks.append(layers[-1].register_forward_hook(keep_last))
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            ids = torch.tensor([replay], device=next(model.parameters()).device)
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
            last[0].float().square().sum().backward()
        return [out.grad[0].float().norm(dim=-1) for out in outputs]  # (n,) per layer
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)


def _value_write_norms(model, layer: int, values: torch.Tensor) -> torch.Tensor:
    """||W_O^h v_c|| for every query head h and cached value v_c of its KV head: (Hq, T) float32.

    values: (H, T, D), on the CPU, as the KV holds them. Computed as sqrt(v^T (W_h^T W_h) v) with the (D, D) Gram matrix of each head's
    slice of the output projection."""
    weight = model.model.layers[layer].self_attn.o_proj.weight.detach().float().cpu()  # (hidden, Hq * D)
    H, T, D = values.shape
    heads = weight.shape[1] // D
    group = heads // H
    w = weight.view(-1, heads, D).transpose(0, 1)  # (Hq, hidden, D)
    gram = torch.matmul(w.transpose(1, 2), w)  # (Hq, D, D)
    v = values.float().repeat_interleave(group, dim=0)  # (Hq, T, D)
    return torch.einsum("htd,hde,hte->ht", v, gram, v).clamp_min(0).sqrt()
