"""apply_seed_fast_to_blip2 / revert_seed_fast_blip2 on transformers' real BLIP-2 and InstructBLIP classes.

Tiny random configs, fresh random weights and inputs per test (the seed is printed and named in every
assertion). Accuracy rule (flash-attention's): against the same model in float64, the patched model's
fp32 error is at most 2x the stock fp32 model's error (plus a few ulp of the output's scale).
"""

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Model,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    OPTConfig,
    OPTForCausalLM,
)

from seed_fast.integrations import apply_seed_fast_to_blip2, revert_seed_fast_blip2
from seed_fast.ops import record_dispatch
from seed_fast.testing import assert_close

ROOT = Path(__file__).resolve().parents[2]
VISION = dict(
    hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
)
QFORMER = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=56, encoder_hidden_size=32)
TEXT = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=40, num_attention_heads=4, word_embed_proj_dim=32
)
NUM_QUERY, IMAGE_TOKEN = 5, 98
N_CROSS = len(range(0, QFORMER["num_hidden_layers"], 2))  # cross_attention_frequency 2: layers 0, 2


@pytest.fixture
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed {s}")
    return s


def _qformer(impl="sdpa", dropout=0.1, **kw):
    cfg = Blip2QFormerConfig(**{**QFORMER, **kw}, attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout)
    return Blip2QFormerModel._from_config(cfg, attn_implementation=impl).eval()


def _blip2(cls=Blip2ForConditionalGeneration, impl="sdpa"):
    text = OPTConfig(**TEXT, max_position_embeddings=64).to_dict()
    cfg = Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=text,
        num_query_tokens=NUM_QUERY,
        image_token_id=IMAGE_TOKEN,
    )
    return cls._from_config(cfg, attn_implementation=impl).eval()


def _instructblip(impl="sdpa"):
    text = OPTConfig(**TEXT, max_position_embeddings=64).to_dict()
    cfg = InstructBlipConfig(
        vision_config=VISION,
        qformer_config={**QFORMER, "vocab_size": 77, "max_position_embeddings": 32},
        text_config=text,
        num_query_tokens=NUM_QUERY,
        image_token_index=IMAGE_TOKEN,
    )
    return InstructBlipForConditionalGeneration._from_config(cfg, attn_implementation=impl).eval()


def _padding(batch, length):
    """(batch, length) long 0/1 mask, each row keeping a random prefix of at least one token; row 0 keeps all."""
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0] = length
    return (torch.arange(length)[None, :] < lengths[:, None]).long()


def _qformer_inputs(batch=3, masked=True, lq=NUM_QUERY, lk=17):
    inputs = {
        "query_embeds": torch.randn(batch, lq, QFORMER["hidden_size"]),
        "encoder_hidden_states": torch.randn(batch, lk, QFORMER["encoder_hidden_size"]),
    }
    if masked:
        inputs["attention_mask"] = _padding(batch, lq)
        inputs["encoder_attention_mask"] = _padding(batch, lk)
    return inputs


def _lm_inputs(batch=3, length=11):
    ids = torch.randint(0, IMAGE_TOKEN - 1, (batch, length))
    ids[:, :NUM_QUERY] = IMAGE_TOKEN
    return {"pixel_values": torch.randn(batch, 3, 16, 16), "input_ids": ids}


def _double(inputs):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def _check(patched, stock, truth, name, seed, scale=None):
    """Patched within 2x the stock model's fp32 error, both against float64, plus 4 ulp of the scale
    (by default the truth's largest magnitude)."""
    scale = float(truth.abs().max()) if scale is None else scale
    stock_err = float((stock.double() - truth).abs().max())
    atol = 2 * stock_err + 4 * torch.finfo(torch.float32).eps * scale
    assert_close(patched, truth, atol=atol, rtol=0.0, name=f"{name} (seed {seed}, stock fp32 err {stock_err:.2e})")


def _fast_calls(log, expected):
    """Every Q-Former attention call took the fast path."""
    originals = [impl for op, impl in log if op == "blip2_qformer_attention"]
    assert not originals, originals
    assert sum(op == "qformer_attention" for op, _ in log) == expected, log


def _attention_modules(model):
    return [
        m for name, m in model.named_modules() if name.endswith((".attention.attention", ".crossattention.attention"))
    ]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding-mask"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_qformer_model_matches_the_stock_model(impl, masked, seed):
    stock = _qformer(impl)
    truth = copy.deepcopy(stock).double()
    patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
    inputs = _qformer_inputs(masked=masked)
    with torch.no_grad():
        with record_dispatch() as log:
            out = patched(**inputs)
        ref, tru = stock(**inputs), truth(**_double(inputs))
    _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
    _check(out.last_hidden_state, ref.last_hidden_state, tru.last_hidden_state, "last hidden state", seed)
    _check(out.pooler_output, ref.pooler_output, tru.pooler_output, "pooled output", seed)


@pytest.mark.parametrize("cls", [Blip2ForConditionalGeneration, Blip2Model])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_blip2_logits_match_the_stock_model(cls, impl, seed):
    stock = _blip2(cls, impl)
    truth = copy.deepcopy(stock).double()
    patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
    assert patched.vision_model.config._attn_implementation == "sdpa"
    inputs = _lm_inputs()
    with torch.no_grad():
        with record_dispatch() as log:
            out = patched(**inputs)
        ref, tru = stock(**inputs), truth(**_double(inputs))
    _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
    _check(out.logits, ref.logits, tru.logits, "logits", seed)
    q = "qformer_outputs"
    _check(out[q].last_hidden_state, ref[q].last_hidden_state, tru[q].last_hidden_state, "Q-Former output", seed)
    if cls is Blip2ForConditionalGeneration:
        with torch.no_grad(), record_dispatch() as log:
            patched.generate(**inputs, max_new_tokens=2)
        _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)


def test_gradients_match_in_train_mode(seed):
    stock = _qformer("eager", dropout=0.0).train()
    truth = copy.deepcopy(stock).double()
    patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
    inputs = _qformer_inputs()
    weight = torch.randn(3, NUM_QUERY, QFORMER["hidden_size"])

    def grads(model, inputs, log=None):
        out = model(**inputs)
        loss = (out.last_hidden_state * weight.to(out.last_hidden_state.dtype)).sum() + out.pooler_output.square().sum()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    with record_dispatch() as log:
        got = grads(patched, inputs)
    _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
    ref, tru = grads(stock, inputs), grads(truth, _double(inputs))
    assert got.keys() == ref.keys() and all(g is not None for g in got.values())
    for name in got:
        # a key bias adds the same q.b to every score of a row: its gradient is zero up to the rounding of
        # sums whose terms are the size of the key weight's gradient, so that sets the scale
        scale = float(tru[name.replace("key.bias", "key.weight")].abs().max()) if name.endswith("key.bias") else None
        _check(got[name], ref[name], tru[name], f"grad of {name}", seed, scale)


def test_revert_restores_the_original_model_bitwise(seed):
    model = _blip2(impl="eager")
    inputs = _lm_inputs()
    keys = list(model.state_dict())
    hooks = (dict(model.qformer._forward_hooks), dict(model.qformer._forward_pre_hooks))
    with torch.no_grad():
        ref = model(**inputs)
        apply_seed_fast_to_blip2(model)
        assert model.vision_model.config._attn_implementation == "sdpa"
        assert model.qformer.config._attn_implementation == "eager"
        assert all("forward" in m.__dict__ for m in _attention_modules(model))
        with record_dispatch() as log:
            model(**inputs)
        _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
        assert list(model.state_dict()) == keys  # no buffers or parameters added
        assert revert_seed_fast_blip2(model) is model
        with record_dispatch() as log:
            back = model(**inputs)
    assert log == []
    assert torch.equal(back.logits, ref.logits), f"seed {seed}"
    assert torch.equal(back.qformer_outputs.last_hidden_state, ref.qformer_outputs.last_hidden_state)
    assert model.vision_model.config._attn_implementation == "eager"
    assert not any("forward" in m.__dict__ or "_seed_fast_blip2_attn" in m.__dict__ for m in _attention_modules(model))
    assert (dict(model.qformer._forward_hooks), dict(model.qformer._forward_pre_hooks)) == hooks
    assert "_seed_fast_blip2" not in model.__dict__
    assert revert_seed_fast_blip2(model) is model  # reverting an unpatched model changes nothing


def test_applying_twice_is_a_no_op():
    model = _blip2()
    apply_seed_fast_to_blip2(model)
    forwards = [m.__dict__["forward"] for m in _attention_modules(model)]
    assert apply_seed_fast_to_blip2(model) is model
    assert [m.__dict__["forward"] for m in _attention_modules(model)] == forwards
    assert all(a is b for a, b in zip(forwards, (m.__dict__["forward"] for m in _attention_modules(model))))
    with pytest.raises(ValueError, match="already patched with .*revert_seed_fast_blip2"):
        apply_seed_fast_to_blip2(model, fuse_projections=False)
    revert_seed_fast_blip2(model)  # one revert undoes it all
    assert not any("forward" in m.__dict__ for m in _attention_modules(model))
    # a submodule patched on its own: the outer model refuses until that one is reverted
    apply_seed_fast_to_blip2(model.qformer)
    with pytest.raises(ValueError, match="'qformer'.*already patched"):
        apply_seed_fast_to_blip2(model)
    revert_seed_fast_blip2(model.qformer)
    apply_seed_fast_to_blip2(model)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        apply_seed_fast_to_blip2(_qformer(), attn_impl="fast")


def test_weight_changes_after_patching_are_seen(seed):
    patched = apply_seed_fast_to_blip2(_qformer(dropout=0.0))
    stock = _qformer(dropout=0.0)
    inputs = _qformer_inputs()

    def compare(what):
        stock.load_state_dict(patched.state_dict())
        dtype = next(patched.parameters()).dtype
        stock.to(dtype)
        truth = copy.deepcopy(stock).double()
        ins = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            out, ref, tru = patched(**ins), stock(**ins), truth(**_double(ins))
        _check(out.last_hidden_state, ref.last_hidden_state, tru.last_hidden_state, what, seed)

    compare("before any change")  # fills the fused-weight cache
    # an optimizer step (in-place updates of the parameters)
    opt = torch.optim.SGD(patched.parameters(), lr=0.5)
    patched.train()
    patched(**inputs).last_hidden_state.square().mean().backward()
    opt.step()
    patched.eval()
    compare("after an optimizer step")
    # load_state_dict with fresh values
    fresh = _qformer(dropout=0.0).state_dict()
    patched.load_state_dict(fresh)
    compare("after load_state_dict")
    # an in-place edit of one projection
    with torch.no_grad():
        patched.encoder.layer[1].attention.attention.value.weight.mul_(-2.0)
        patched.encoder.layer[0].crossattention.attention.key.bias.add_(1.0)
    compare("after in-place edits")
    # new storage: a dtype round trip
    patched.double()
    compare("in float64")
    patched.float()
    compare("back in float32")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_instructblip_with_instruction_tokens_matches(impl, seed):
    stock = _instructblip(impl)
    truth = copy.deepcopy(stock).double()
    patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
    inputs = _lm_inputs()
    inputs["qformer_input_ids"] = torch.randint(1, 77, (3, 7))
    inputs["qformer_attention_mask"] = _padding(3, 7)
    with torch.no_grad():
        with record_dispatch() as log:
            out = patched(**inputs)
        ref, tru = stock(**inputs), truth(**_double(inputs))
    _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
    _check(out.logits, ref.logits, tru.logits, "InstructBLIP logits", seed)
    q = "qformer_outputs"
    _check(out[q].last_hidden_state, ref[q].last_hidden_state, tru[q].last_hidden_state, "InstructBLIP Q-Former", seed)


def test_a_model_of_another_family_is_a_type_error():
    opt = OPTForCausalLM(OPTConfig(**TEXT, max_position_embeddings=64))
    for fn in (apply_seed_fast_to_blip2, revert_seed_fast_blip2):
        for wrong in (opt, torch.nn.Linear(3, 3), "Salesforce/blip2-opt-2.7b"):
            with pytest.raises(TypeError) as e:
                fn(wrong)
            msg = str(e.value)
            assert fn.__name__ in msg and "Blip2PreTrainedModel" in msg and "InstructBlipPreTrainedModel" in msg
            assert type(wrong).__qualname__ in msg


def test_calls_the_fast_path_cannot_match_take_the_original(seed):
    stock = _qformer("eager")
    truth = copy.deepcopy(stock).double()
    patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
    inputs = _qformer_inputs()
    b, lq = inputs["query_embeds"].shape[:2]
    layers = QFORMER["num_hidden_layers"]

    def both(why, n_original, **extra):
        """n_original calls take the original forward for `why`; bitwise equal when all calls do."""
        with torch.no_grad():
            torch.manual_seed(seed)
            with record_dispatch() as log:
                out = patched(**inputs, **extra)
            torch.manual_seed(seed)
            ref = stock(**inputs, **extra)
        originals = [impl for op, impl in log if op == "blip2_qformer_attention"]
        assert len(originals) == n_original and all(why in o for o in originals), log
        if n_original == layers + N_CROSS:
            assert torch.equal(out.last_hidden_state, ref.last_hidden_state), why
        else:
            with torch.no_grad():
                tru = truth(**_double(inputs), **extra)
            _check(out.last_hidden_state, ref.last_hidden_state, tru.last_hidden_state, why, seed)
        return out, ref

    out, ref = both("attention weights requested", layers + N_CROSS, output_attentions=True)
    # (transformers 5.25 also lists the cross-attentions under `attentions`: ".attention" matches both)
    assert len(out.attentions) >= layers and len(out.cross_attentions) == N_CROSS
    assert len(out.attentions) == len(ref.attentions)
    assert all(
        torch.equal(a, r) for a, r in zip(out.attentions + out.cross_attentions, ref.attentions + ref.cross_attentions)
    )
    patched.train(), stock.train()  # attention dropout 0.1
    both("attention dropout p=0.1 in training", layers + N_CROSS)
    patched.eval(), stock.eval()
    # a 4D mask whose query rows differ (causal) is not a key padding mask: the self-attention takes the original
    causal = torch.ones(lq, lq, dtype=torch.bool).tril()
    inputs["attention_mask"] = torch.zeros(b, 1, lq, lq).masked_fill(~causal, torch.finfo(torch.float32).min)
    both("not one key padding row per sample", layers)
    # a sample with no image token to attend (eager averages every value, seed_fast's op gives zeros): the
    # cross-attention takes the original
    inputs["attention_mask"] = None
    inputs["encoder_attention_mask"][1] = 0
    both("leaves a sample no key to attend", N_CROSS)


def test_self_attention_projects_q_k_v_in_one_matmul():
    """torch.profiler: per layer, one aten::linear with the (3D, D) weight and none of Q, K, V alone."""
    patched = apply_seed_fast_to_blip2(_qformer())
    stock = _qformer()
    inputs = _qformer_inputs(masked=False)
    d, layers = QFORMER["hidden_size"], QFORMER["num_hidden_layers"]

    def linears(model):
        with (
            torch.no_grad(),
            torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof,
        ):
            model(**inputs)
        return [e.input_shapes for e in prof.events() if e.name == "aten::linear"]

    got, ref = linears(patched), linears(stock)
    fused = [s for s in got if s[1] == [3 * d, d]]
    assert len(fused) == layers, got
    assert sum(s[1] == [2 * d, QFORMER["encoder_hidden_size"]] for s in got) == N_CROSS, got
    # stock: Q, K, V (3) per self-attention and cross-attention; patched: 1 and 2 (Q, fused K/V)
    assert len(ref) - len(got) == 2 * layers + N_CROSS, (len(ref), len(got))


def test_vision_sdpa_switches_only_an_eager_tower():
    model = _blip2(impl="eager")
    apply_seed_fast_to_blip2(model, vision_sdpa=False)
    assert model.vision_model.config._attn_implementation == "eager"
    revert_seed_fast_blip2(model)
    apply_seed_fast_to_blip2(model)
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"  # the same config object
    assert model.qformer.config._attn_implementation == "eager"  # the fallback keeps eager's attention weights
    revert_seed_fast_blip2(model)
    assert model.vision_model.config._attn_implementation == "eager"


def test_under_an_accelerate_hook_the_hook_still_runs(seed):
    hooks = pytest.importorskip("accelerate.hooks")

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    stock = _qformer()
    patched = copy.deepcopy(stock)
    attn = patched.encoder.layer[0].attention.attention
    hooks.add_hook_to_module(attn, Count())
    wrapper, old = attn.__dict__["forward"], attn.__dict__["_old_forward"]
    apply_seed_fast_to_blip2(patched)
    assert attn.__dict__["forward"] is wrapper  # the hook's wrapper stays outermost
    inputs = _qformer_inputs()
    with torch.no_grad():
        with record_dispatch() as log:
            out = patched(**inputs)
        ref = stock(**inputs)
    _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
    assert Count.calls == 1
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5, name=f"seed {seed}")
    revert_seed_fast_blip2(patched)
    assert attn.__dict__["forward"] is wrapper and attn.__dict__["_old_forward"] is old


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_matches_the_stock_model(dtype, seed):
    """The CUDA dispatch (Triton or an SDPA kernel) inside the full model, and the padded-mask path."""
    for stock, inputs in (
        (_blip2(impl="sdpa"), _lm_inputs()),
        (_qformer("sdpa"), _qformer_inputs(masked=True)),
    ):
        stock = stock.to("cuda", dtype)
        inputs = {k: v.to("cuda", dtype) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}
        truth = copy.deepcopy(stock).double()
        patched = apply_seed_fast_to_blip2(copy.deepcopy(stock))
        with torch.no_grad():
            with record_dispatch() as log:
                out = patched(**inputs)
            ref, tru = stock(**inputs), truth(**_double(inputs))
        _fast_calls(log, QFORMER["num_hidden_layers"] + N_CROSS)
        key = "logits" if "logits" in out else "last_hidden_state"
        _check(out[key], ref[key], tru[key], f"{type(stock).__name__} {key} on CUDA, {dtype}", seed)


def test_benchmark_script_runs_on_tiny_shapes(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_blip2

    rows = bench_blip2.main(["--device", "cpu", "--shape", "tiny", "--batches", "1,3", "--repeats", "2"])
    assert {r["B"] for r in rows} == {1, 3}
    patched = [r for r in rows if r["provider"].startswith("seed_fast")]
    assert len(patched) == 2 and all(float(r["vs_stock"].rstrip("x")) > 0 for r in patched), rows
    assert all(float(r["check"].split()[0]) < 1e-4 for r in rows), rows
    assert "results in" not in capsys.readouterr().out  # nothing written without --out
    bench_blip2.main(["--device", "cpu", "--shape", "tiny", "--batches", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert (tmp_path / "bench_blip2_float32.md").is_file() and (tmp_path / "bench_blip2_float32.json").is_file()
