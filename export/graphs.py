"""The modules that are traced into ONNX: each wraps one part of the stack with plain tensor inputs
and outputs, on the reference (plain torch) path, so the graphs hold standard ONNX ops only.

    TokenizerGraph    images (B, 3, S, S) uint8 or float in [0, 1]  -> codes (B, 32) int64
    DetokenizerGraph  codes (B, 32) int64                            -> generation embedding (B, D)
    LMGraph           input_ids, attention_mask, position_ids, past  -> last-position logits, present
    UNetGraph         sample, timestep, embedding                    -> the UNet's prediction
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.hf_compat import output_cache, with_cache
from ..models.preprocess import normalize
from ..ops.codebook_lookup import squared_distances

# codes per distance block in the exported nearest-code search: (rows, 256, D) fp32 at a time
CODE_CHUNK = 256


def nearest_code(z: torch.Tensor, book: torch.Tensor, chunk: int = CODE_CHUNK) -> torch.Tensor:
    """Index of the nearest codebook row for each row of z, in fp32, as `codebook_lookup_ref` does:
    its `squared_distances`, the lowest index on ties. The codebook is walked in static blocks of
    `chunk` codes so no (N, K, D) tensor is built; each block's best is kept where it is strictly
    better than the blocks before.

    z: (N, D), book: (K, D) -> (N,) int64."""
    z, book = z.float(), book.float()
    best_d = best_i = None
    for start in range(0, book.shape[0], chunk):
        block = book[start : start + chunk]
        d, i = squared_distances(z, block).min(dim=-1)  # over (N, chunk)
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
        else:
            better = d < best_d
            best_d = torch.where(better, d, best_d)
            best_i = torch.where(better, i, best_i)
    return best_i


class TokenizerGraph(nn.Module):
    """Images -> codes. uint8 images are divided by 255; float images are clamped to [0, 1] (the
    runtime checks their range first). The image must already be S x S (the runtime resizes)."""

    def __init__(self, tok, *, uint8: bool, chunk: int = CODE_CHUNK):
        super().__init__()
        self.tok = tok
        self.uint8 = uint8
        self.chunk = chunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tok = self.tok
        x = images.float() / 255.0 if self.uint8 else images.float().clamp(0.0, 1.0)
        x = normalize(x, tok.config.image_mean, tok.config.image_std).to(tok.dtype)
        z = tok.quantizer.encode_task_layer(tok.causal_embeddings(x))  # (B, 32, code_dim)
        codes = nearest_code(z.reshape(-1, z.shape[-1]), tok.quantizer.codebook.weight, self.chunk)
        return codes.view(z.shape[0], z.shape[1])


class DetokenizerGraph(nn.Module):
    """Codes -> generation embedding (fp32 out whatever the weights' dtype)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.tok.generation_embedding(codes).float()


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a transformers decoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return layers, kv_heads, head_dim


class LMGraph(nn.Module):
    """One decoder call with an explicit KV cache, for prefill (past length 0) and decode alike.

    input_ids (B, T) int64; attention_mask (B, P + T) int64 (left padding: 0 where no token);
    position_ids (B, T) int64; past_key_values.i.key / .value (B, H, P, Dh) per layer ->
    logits (B, T, V) fp32 (every position: optimum's ORTModelForCausalLM layout), present.i.key /
    .value (B, H, P + T, Dh)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = kv_shape(model.config)[0]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **with_cache(cache),
            use_cache=True,
        )
        present = []
        for layer in output_cache(out).layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (out.logits.float(), *present)


class UNetGraph(nn.Module):
    """The image decoder's denoiser: sample (B, C, S, S), timestep (B,) int64, embedding (B, D) ->
    prediction (B, C, S, S) fp32, conditioned as `SeedImageDecoderPipeline._denoise` does."""

    def __init__(self, pipe):
        super().__init__()
        self.pipe = pipe
        self.unet = pipe.unet

    def forward(self, sample, timestep, embedding):
        dt = self.unet.dtype
        return self.pipe._denoise(sample.to(dt), timestep, embedding.to(dt)).float()


class UnclipUNetGraph(nn.Module):
    """Stable unCLIP's denoiser: latents (B, 4, h, w), timestep (B,) int64, text states (B, T, C) and
    class labels (B, 2D: the noise-augmented image embedding and its noise-level embedding) -> the
    noise (or v) prediction (B, 4, h, w) fp32, as StableUnCLIPImg2ImgPipeline calls its UNet."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels):
        dt = self.unet.dtype
        out = self.unet(
            sample.to(dt),
            timestep,
            encoder_hidden_states=encoder_hidden_states.to(dt),
            class_labels=class_labels.to(dt),
        ).sample
        return out.float()


class VaeDecodeGraph(nn.Module):
    """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (fp32): vae.decode(latents / scaling_factor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents):
        return self.vae.decode(latents.to(self.vae.dtype) / self.scale).sample.float()
