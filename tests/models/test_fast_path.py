"""SeedTokenizer.to_fast(): same outputs as the reference path, reversible, causal, trainable."""

import pytest
import torch

from seed_fast import SeedTokenizer
from seed_fast.ops.qformer_attention import not_supported_reasons
from seed_fast.testing import assert_close, assert_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tok(seed=5):
    return SeedTokenizer.from_config("tiny", seed=seed, init="unit").to(DEVICE).eval()


def _images(n, seed):
    return torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _triton_runs():
    x = torch.empty(1, 1, 2, 16, device=DEVICE)
    return not not_supported_reasons("triton", x, x, x)


IMPLS = ["sdpa", "ref"] + (["triton"] if _triton_runs() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_fast_path_matches_reference(impl, seed):
    tok = _tok()
    imgs = _images(3, seed=seed)
    ref_emb, ref_codes = tok.encode_embeddings(imgs), tok.encode(imgs)
    tok.to_fast(attn_impl=impl)
    assert tok.is_fast
    emb, codes = tok.encode_embeddings(imgs), tok.encode(imgs)
    assert_close(emb, ref_emb, atol=1e-5 * float(ref_emb.abs().max()), rtol=0, name=f"fast path ({impl})")
    assert_equal(codes, ref_codes, name="codes")


def test_fast_is_the_default():
    assert SeedTokenizer.from_config("tiny", seed=0).is_fast


def test_to_reference_restores_the_exact_reference(seed):
    tok = _tok().to_reference()
    imgs = _images(2, seed=seed)
    before = tok.encode_embeddings(imgs)
    sd = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.to_fast()
    assert tok.state_dict().keys() == sd.keys(), "to_fast must not change the checkpoint layout"
    tok.to_reference()
    assert not tok.is_fast
    assert_equal(tok.encode_embeddings(imgs), before, name="embeddings")
    for k, v in tok.state_dict().items():
        assert_equal(v, sd[k], name=k)


def test_fused_weights_follow_weight_changes(seed):
    tok = _tok().to_fast()
    imgs = _images(2, seed=seed)
    tok.encode_embeddings(imgs)  # fills the fused-weight cache
    with torch.no_grad():  # in-place edits, as an optimizer step or load_state_dict does
        tok.qformer.layers[0].crossattention.self.key.weight.mul_(1.5)
        tok.qformer.layers[1].attention.self.value.bias.add_(0.3)
    fast = tok.encode_embeddings(imgs)
    tok.to_reference()
    ref = tok.encode_embeddings(imgs)
    assert_close(fast, ref, atol=1e-5 * float(ref.abs().max()), rtol=0, name="after in-place edits")
    # and after re-assigning a parameter (new storage)
    tok.to_fast()
    tok.encode_embeddings(imgs)
    lin = tok.qformer.layers[2].attention.self.query
    lin.weight = torch.nn.Parameter(lin.weight.detach() * -1.0)
    fast = tok.encode_embeddings(imgs)
    ref = tok.to_reference().encode_embeddings(imgs)
    assert_close(fast, ref, atol=1e-5 * float(ref.abs().max()), rtol=0, name="after re-assigning a parameter")


def test_fast_path_is_causal(seed):
    tok = _tok().to_fast()
    feats = tok.image_features(tok.preprocess(_images(1, seed=seed)))
    queries = tok.qformer.query_tokens.detach().clone()
    with torch.no_grad():
        base = tok.qformer(feats, queries)
        for j in (0, 7, 31):
            q2 = queries.clone()
            q2[:, j] += 1.0
            out = tok.qformer(feats, q2)
            assert_equal(out[:, :j], base[:, :j], name=f"outputs before query {j}")
            assert not torch.equal(out[:, j:], base[:, j:])


@pytest.mark.parametrize("impl", IMPLS)
def test_fast_path_gradients_match_reference(impl, seed):
    """Stage-I training through the fast path: gradients reach the original (unfused) weights."""
    feats = torch.randn(2, 257, 96, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    grads = {}
    for mode in ("ref", "fast"):
        tok = _tok(seed=9).train()
        if mode == "fast":
            tok.qformer.set_fast(True, impl=impl)
        out = tok.qformer(feats)
        (out.square().mean()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in tok.qformer.named_parameters() if p.grad is not None}
    assert grads["ref"].keys() == grads["fast"].keys()
    for name, g in grads["ref"].items():
        assert_close(grads["fast"][name], g, atol=1e-4 * float(g.abs().max()) + 1e-7, rtol=0, name=name)


def test_packed_projections_get_one_packed_gradient():
    """The fast path's packed Q/K/V (and cross K/V) projections are split with unbind, whose backward
    writes one packed gradient, never by indexing (a zero-filled packed buffer per gradient, then adds)."""
    tok = _tok().train()
    tok.qformer.set_fast(True, impl="sdpa")
    out = tok.qformer(torch.randn(2, 257, 96, device=DEVICE, requires_grad=True))
    names, seen, stack = [], set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert "UnbindBackward0" in names
    assert not [n for n in names if n.startswith("SelectBackward")], sorted(set(names))


def test_fast_path_runs_under_torch_compile(seed):
    tok = _tok().to_fast()
    feats = torch.randn(2, 257, 96, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        eager = tok.qformer(feats)
        compiled = torch.compile(tok.qformer, fullgraph=True, backend="aot_eager")(feats)
    assert_close(compiled, eager, atol=1e-5 * float(eager.abs().max()), rtol=0, name="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_replay_matches_eager(dtype, seed):
    tok = _tok().to(dtype)
    imgs = _images(3, seed=seed)
    ref_codes = tok.encode(imgs)
    ref_emb = tok.encode_embeddings(imgs)
    tok.to_fast(cuda_graph=True)
    for _ in range(3):  # capture, then replays
        codes, emb = tok.encode(imgs), tok.encode_embeddings(imgs)
    assert tok._graphs["codes"].num_graphs == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = float(ref_emb.float().abs().max())
    assert_close(emb, ref_emb, atol=tol * scale, rtol=0, name=f"replayed {dtype}")
    if dtype == torch.float32:
        assert_equal(codes, ref_codes, name="replayed codes")
    # a weight change in place is seen by the next replay
    with torch.no_grad():
        tok.qformer.layers[0].crossattention.self.value.weight.mul_(0.5)
    replayed = tok.encode_embeddings(imgs)
    tok.to_reference()
    assert_close(replayed, tok.encode_embeddings(imgs), atol=tol * scale, rtol=0, name="after a weight change")


def test_refresh_fused_skips_work_only_while_no_weight_changed():
    qf = _tok().qformer
    qf.refresh_fused()
    w0, _ = qf.fused._entries["qkv0"][1:]
    kept = w0.clone()
    qf.refresh_fused()  # nothing changed: the cached tensors stay as they are
    assert_equal(qf.fused._entries["qkv0"][1], kept, name="cached qkv weight")
    with torch.no_grad():
        qf.layers[0].attention.self.query.weight.add_(1.0)
    qf.refresh_fused()
    w1 = qf.fused._entries["qkv0"][1]
    q_rows = qf.layers[0].attention.self.query.weight.shape[0]
    assert_equal(w1[:q_rows], qf.layers[0].attention.self.query.weight, name="refreshed q rows")
    assert not torch.equal(w1[:q_rows], kept[:q_rows])


def test_graph_policy_counts_shapes_and_respects_max_batch():
    from seed_fast.models.cuda_graph import GraphedForward

    g = GraphedForward(lambda x: x, max_batch=4, capture_after=1, max_graphs=2)
    k1, k2 = ((1, 3), "f16", "cuda:0"), ((2, 3), "f16", "cuda:0")
    assert not g.wants_graph(k1, 1), "the first call of a shape runs eagerly"
    assert g.wants_graph(k1, 1), "the second call captures"
    assert not g.wants_graph(((9, 3), "f16", "cuda:0"), 9) and not g.wants_graph(((9, 3), "f16", "cuda:0"), 9)
    assert not g.wants_graph(k2, 2)
    g.reset()
    assert not g.wants_graph(k2, 2), "reset forgets the counts"
    g.disabled_reason = "capture failed"
    assert not g.wants_graph(k2, 2)
    eager_first = GraphedForward(lambda x: x)
    assert eager_first.wants_graph(k1, 1000), "capture_after=0, no max_batch: every call"
    for bad in ({"max_batch": 0}, {"capture_after": -1}, {"max_graphs": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GraphedForward(lambda x: x, **bad)
    x = torch.randn(2, 3)
    assert g(x) is x, "CPU inputs call fn"


def test_tokenizer_graphs_are_the_default_and_dropped_when_the_model_moves(monkeypatch):
    import copy

    from seed_fast.models import cuda_graph
    from seed_fast.models.seed import tokenizer

    tok = _tok()
    graphs = tok._graphs
    assert graphs is not None and set(graphs) == {"codes", "embeddings"}
    assert all(g.max_batch == tokenizer.GRAPH_AUTO_MAX_BATCH and g.capture_after == 1 for g in graphs.values())
    resets = []
    monkeypatch.setattr(cuda_graph.GraphedForward, "reset", lambda self: resets.append(self))
    tok.double()
    tok.float()
    assert len(resets) == 4, "each cast drops both forwards' graphs"
    monkeypatch.undo()
    assert copy.deepcopy(tok)._graphs["codes"].num_graphs == 0
    tok.to_fast(cuda_graph=True)
    assert all(g.max_batch is None and g.capture_after == 0 for g in tok._graphs.values())
    assert tok.to_fast(cuda_graph=False)._graphs is None
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto'"):
        tok.to_fast(cuda_graph="always")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_default_encode_replays_a_graph_from_the_second_call(seed):
    tok = _tok()
    imgs = _images(1, seed=seed)
    first = tok.encode(imgs)
    assert tok._graphs["codes"].num_graphs == 0, "a one-off call is not captured"
    for _ in range(2):
        again = tok.encode(imgs)
    assert tok._graphs["codes"].num_graphs == 1
    assert_equal(again, first, name="replayed codes")
    big = _images(33, seed=seed)
    tok.encode(big)
    tok.encode(big)
    assert tok._graphs["codes"].num_graphs == 1, "batches above GRAPH_AUTO_MAX_BATCH stay eager"
    tok.half()
    assert tok._graphs["codes"].num_graphs == 0, "casting drops the graphs"
    tok.encode(imgs)
    tok.encode(imgs)
    assert tok._graphs["codes"].num_graphs == 1


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_a_failed_capture_warns_once_and_runs_eagerly():
    from seed_fast.models.cuda_graph import GraphedForward

    g = GraphedForward(lambda x: x * float(x.sum()))  # a host sync cannot be captured
    x = torch.randn(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = g(x)
    assert_close(out, x * float(x.sum()), name="eager result")
    assert g.disabled_reason and g.num_graphs == 0
    assert_close(g(x), x * float(x.sum()), name="later calls")


def test_compiled_vit_blocks_give_the_reference_codes(seed):
    """to_fast(compile_vit=True) runs each ViT block as one torch.compile region (inductor): the same
    codes as the reference path; to_reference() and to_fast() without it drop the regions."""
    tok = _tok()
    imgs = _images(2, seed=seed)
    ref_emb, ref_codes = tok.encode_embeddings(imgs), tok.encode(imgs)
    tok.to_fast(compile_vit=True)
    assert all(blk._compiled_call_impl is not None for blk in tok.vision.blocks)
    emb = tok.encode_embeddings(imgs)
    assert_close(emb, ref_emb, atol=1e-4 * float(ref_emb.abs().max()), rtol=0, name="compiled ViT blocks")
    assert_equal(tok.encode(imgs), ref_codes, name="codes")
    tok.to_fast()
    assert all(blk._compiled_call_impl is None for blk in tok.vision.blocks)
    tok.to_fast(compile_vit="default").to_reference()
    assert all(blk._compiled_call_impl is None for blk in tok.vision.blocks)
    with pytest.raises(ValueError, match="compile_vit must be"):
        tok.to_fast(compile_vit=3)
