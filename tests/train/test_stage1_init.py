"""Stage I from BLIP-2 weights: the text branch, projections and temperature load from transformers'
and LAVIS' key layouts, and the text features equal transformers' Q-Former text path."""

import pytest
import torch
import torch.nn.functional as F

from seed_fast.testing import assert_close, assert_equal
from seed_fast.train import ConfigError, TrainConfig
from seed_fast.train.stage1 import Stage1Task, blip2_text_branch

transformers = pytest.importorskip("transformers")


def _hf_retrieval_state(tok_cfg, vocab: int, seed: int):
    """A state dict in Blip2ForImageTextRetrieval's layout for a tiny Q-Former, and that Q-Former."""
    q = tok_cfg.qformer
    hf_cfg = transformers.Blip2QFormerConfig(
        hidden_size=q.hidden,
        num_hidden_layers=q.layers,
        num_attention_heads=q.heads,
        intermediate_size=q.ffn,
        encoder_hidden_size=tok_cfg.vision.width,
        cross_attention_frequency=q.cross_attention_freq,
        layer_norm_eps=q.ln_eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        use_qformer_text_input=True,
        vocab_size=vocab,
        max_position_embeddings=40,
    )
    torch.manual_seed(seed)
    hf = transformers.Blip2QFormerModel(hf_cfg).eval()
    for prm in hf.parameters():  # BERT init leaves LayerNorms at 1 / 0: perturb everything
        prm.data.add_(torch.randn_like(prm) * 0.05)
    sd = {"qformer." + k: v for k, v in hf.state_dict().items()}
    sd["query_tokens"] = torch.randn(1, 32, q.hidden)
    sd["embeddings.word_embeddings.weight"] = torch.randn(vocab, q.hidden) * 0.5
    sd["embeddings.position_embeddings.weight"] = torch.randn(40, q.hidden) * 0.5
    for name in ("vision_projection", "text_projection"):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.randn(256, q.hidden) * 0.1, torch.randn(256) * 0.1
    return sd, hf


def _cfg(out, **s1):
    return TrainConfig.from_dict(
        {
            "stage": "stage1",
            "out": str(out),
            "steps": 1,
            "global_batch": 4,
            "tokenizer": "tiny",
            "data": {"n": 8, "val_n": 4, "image_size": 64},
            "stage1": s1,
        }
    )


def test_text_branch_from_transformers_blip2_matches_its_text_path(tmp_path, seed):
    from safetensors.torch import save_file

    from seed_fast import SeedTokenizer

    probe = Stage1Task(_cfg(tmp_path / "probe"), torch.device("cpu"))
    vocab = len(probe.module.text_tokenizer)
    tok_cfg = SeedTokenizer.from_config("tiny").config
    sd, hf = _hf_retrieval_state(tok_cfg, vocab, seed=seed)
    sd["query_tokens"] = sd["query_tokens"][:, : probe.tok.qformer.query_tokens.shape[1]]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "blip2.safetensors"))

    task = Stage1Task(_cfg(tmp_path / "run", init=str(tmp_path / "blip2.safetensors")), torch.device("cpu"))
    m = task.module
    assert "text.output.0.LayerNorm.weight" in task.init_report["loaded"]
    assert task.init_report["kept_random"] == ["temp"]  # transformers' retrieval model has no learned temperature
    assert_equal(m.tok.qformer.query_tokens, sd["query_tokens"], name="query_tokens")
    ids, mask = m.text_ids(["two red circles left of a blue square", "one green triangle", "red"])
    with torch.no_grad():
        ours = m.encode_ids(ids, mask)
        emb = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][: ids.shape[1]]
        out = hf(query_embeds=emb, query_length=0, attention_mask=mask).last_hidden_state
        ref = F.normalize(out[:, 0] @ sd["text_projection.weight"].t() + sd["text_projection.bias"], dim=-1)
    assert_close(ours, ref, atol=2e-5, rtol=2e-5, name="text features vs transformers")


def test_lavis_key_names_map_to_the_text_branch():
    t = torch.zeros(1)
    sd = {
        "Qformer.bert.embeddings.word_embeddings.weight": t,
        "Qformer.bert.embeddings.position_embeddings.weight": t,
        "Qformer.bert.embeddings.LayerNorm.weight": t,
        "Qformer.bert.encoder.layer.3.intermediate.dense.bias": t,
        "Qformer.bert.encoder.layer.3.output.LayerNorm.weight": t,
        "Qformer.bert.encoder.layer.3.output_query.dense.bias": t,
        "Qformer.bert.encoder.layer.3.attention.self.query.weight": t,
        "vision_proj.weight": t,
        "text_proj.bias": t,
        "temp": t,
        "itm_head.weight": t,
        "visual_encoder.blocks.0.norm1.weight": t,
    }
    assert sorted(blip2_text_branch(sd)) == sorted(
        [
            "text.word_embeddings.weight",
            "text.position_embeddings.weight",
            "text.intermediate.3.dense.bias",
            "text.output.3.LayerNorm.weight",
            "vision_proj.weight",
            "text_proj.bias",
            "temp",
        ]
    )


def test_bad_init_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="stage1.init must be an existing"):
        _cfg(tmp_path / "r", init=str(tmp_path / "missing.pth"))
    save_file(
        {"embeddings.word_embeddings.weight": torch.zeros(3, 8), "qformer.layernorm.weight": torch.ones(8)},
        str(tmp_path / "small.safetensors"),
    )
    with pytest.raises(ConfigError, match="3 word embeddings but the text tokenizer has"):
        Stage1Task(_cfg(tmp_path / "r2", init=str(tmp_path / "small.safetensors")), torch.device("cpu"))
