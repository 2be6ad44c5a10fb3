"""apply_fused_lora on real peft models (tiny random OPT and LLaMA): same outputs and gradients as
peft, reversible, state dict untouched, mixed-adapter batches."""

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import seed_fast.lora as sl  # noqa: E402
from seed_fast.lora import apply_fused_lora, fused_lora_layers, remove_fused_lora  # noqa: E402
from seed_fast.ops.lora_linear import not_supported_reasons  # noqa: E402
from seed_fast.testing import assert_close, assert_equal  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_x = torch.empty(2, 4, device=DEVICE)
IMPLS = ["auto", "torch"] + (["triton"] if not not_supported_reasons("triton", _x, _x, _x) else [])

TARGETS = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _model(kind: str, seed: int = 0, dropout: float = 0.0, adapters=("default",)):
    torch.manual_seed(seed)
    if kind == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=48,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            dropout=0.0,
            attention_dropout=0.0,
        )
        base = transformers.OPTForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=44,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        base = transformers.LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[kind], init_lora_weights=False
    )  # random B too, so the LoRA branch is not zero
    model = peft.get_peft_model(base, lcfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(
            name,
            peft.LoraConfig(
                r=4, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS[kind], init_lora_weights=False
            ),
        )
    return model.to(DEVICE)


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(sl, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sl, name, spy)
    return calls


def _run(model, ids, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_peft_forward_and_backward(kind, impl, monkeypatch, seed):
    calls = _count_calls(monkeypatch, "lora_linear")
    model = _model(kind)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    logits, loss, grads = _run(model, ids)
    assert any("lora_B" in n for n in grads) and any("lora_A" in n for n in grads)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    n = apply_fused_lora(model, impl=impl)
    assert n == 2 * len(TARGETS[kind]) and len(fused_lora_layers(model)) == n
    f_logits, f_loss, f_grads = _run(model, ids)
    assert len(calls) == n, "every LoRA layer must take the fused path, not peft's fallback"
    assert_close(f_logits, logits, atol=1e-5, rtol=1e-5, name="logits")
    assert_close(f_loss, loss, atol=1e-6, rtol=1e-5, name="loss")
    assert f_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert_close(f_grads[name], g, atol=1e-5, rtol=1e-4, name=name)
    sd = model.state_dict()
    assert sd.keys() == sd_before.keys()
    for k in sd:
        assert_equal(sd[k], sd_before[k], name=k)
    assert remove_fused_lora(model) == n and fused_lora_layers(model) == []
    r_logits, _, _ = _run(model, ids)
    assert_equal(r_logits, logits, name="logits after remove_fused_lora")


def test_peft_save_load_round_trip(tmp_path, seed):
    model = _model("llama")
    apply_fused_lora(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    fresh = _model("llama", seed=0)  # same base weights (seed), its own random adapter
    base = fresh.unload()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").to(DEVICE)
    apply_fused_lora(loaded)
    with torch.no_grad():
        after = loaded(input_ids=ids).logits
    assert_close(after, before, atol=1e-5, rtol=1e-5, name="logits after save and load")


def test_fallbacks_keep_peft_semantics(seed):
    model = _model("opt").eval()
    apply_fused_lora(model)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        remove_fused_lora(model)
        with model.disable_adapter():
            peft_off = model(input_ids=ids).logits
    assert_equal(off, peft_off, name="logits with the adapter disabled")


def test_mixed_adapter_batch_matches_peft(monkeypatch, seed):
    calls = _count_calls(monkeypatch, "lora_linear_multi")
    model = _model("llama", adapters=("a", "b")).eval()
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        peft_out = model(input_ids=ids, adapter_names=names).logits
        apply_fused_lora(model)
        ours = model(input_ids=ids, adapter_names=names).logits
    assert len(calls) == 2 * len(TARGETS["llama"])
    assert_close(ours, peft_out, atol=1e-5, rtol=1e-5, name="mixed-adapter logits")


def test_dropout_training_is_repeatable_and_differs_from_eval(seed):
    model = _model("llama", dropout=0.3).train()
    apply_fused_lora(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    torch.manual_seed(seed + 1)
    a = model(input_ids=ids).logits
    torch.manual_seed(seed + 1)
    b = model(input_ids=ids).logits
    assert_equal(b, a, name="logits after the same torch seed")
    model.eval()
    with torch.no_grad():
        c = model(input_ids=ids).logits
    assert not torch.allclose(a.detach(), c)


def test_no_peft_layers_and_bad_impl():
    assert apply_fused_lora(torch.nn.Linear(3, 3)) == 0
    with pytest.raises(ValueError, match="unknown impl"):
        apply_fused_lora(torch.nn.Linear(3, 3), impl="fast")


def test_mixed_batch_reuses_adapter_stacks_until_a_weight_changes(seed):
    model = _model("llama", adapters=("a", "b")).eval()
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    names = ["b", "a", "__base__"]
    apply_fused_lora(model)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "a" in m.lora_A]
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names).logits
        stacks = [m._seed_fast_stacks[1][0] for m in layers]
        again = model(input_ids=ids, adapter_names=names).logits
        assert all(m._seed_fast_stacks[1][0] is s for m, s in zip(layers, stacks)), "rebuilt without a change"
        assert_equal(again, first, name="logits with the stacks reused")
        layers[0].lora_B["a"].weight.add_(0.5)  # in place, as an optimizer step does
        ours = model(input_ids=ids, adapter_names=names).logits
        assert layers[0]._seed_fast_stacks[1][0] is not stacks[0]
        remove_fused_lora(model)
        want = model(input_ids=ids, adapter_names=names).logits
    assert not torch.allclose(ours, first)
    assert_close(ours, want, atol=1e-5, rtol=1e-5, name="logits after an in-place weight change")
