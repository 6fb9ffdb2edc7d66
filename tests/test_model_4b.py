"""The full 4B configuration on the meta device: the official key set, shapes and parameter counts (SPEC 2, 4,
5, 7, 8), enumerated here from the specification independently of the model code."""

from __future__ import annotations

import torch

from infinitevl.checkpoint import to_disk_name
from infinitevl.config import InfiniteVLConfig
from infinitevl.model import InfiniteVLForConditionalGeneration


def official_4b_shapes() -> dict[str, tuple[int, ...]]:
    d, inter, vocab, layers = 2048, 11008, 151936, 36
    H, Dk, Dv, heads, kv, hd = 16, 128, 256, 16, 2, 128
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, d),
            p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        }
        a = p + "self_attn."
        if i % 4 == 0:  # sliding-window attention
            shapes |= {
                a + "q_proj.weight": (heads * hd, d),
                a + "q_proj.bias": (heads * hd,),
                a + "k_proj.weight": (kv * hd, d),
                a + "k_proj.bias": (kv * hd,),
                a + "v_proj.weight": (kv * hd, d),
                a + "v_proj.bias": (kv * hd,),
                a + "o_proj.weight": (d, heads * hd),
            }
        else:  # Gated DeltaNet
            shapes |= {
                a + "q_proj.weight": (H * Dk, d),
                a + "k_proj.weight": (H * Dk, d),
                a + "v_proj.weight": (H * Dv, d),
                a + "a_proj.weight": (H, d),
                a + "b_proj.weight": (H, d),
                a + "A_log": (H,),
                a + "dt_bias": (H,),
                a + "q_conv1d.weight": (H * Dk, 1, 4),
                a + "k_conv1d.weight": (H * Dk, 1, 4),
                a + "v_conv1d.weight": (H * Dv, 1, 4),
                a + "g_proj.weight": (H * Dv, d),
                a + "o_norm.weight": (Dv,),
                a + "o_proj.weight": (d, H * Dv),
            }
    vd, vi = 1280, 3420
    shapes["visual.patch_embed.proj.weight"] = (vd, 3, 2, 14, 14)
    for i in range(32):
        b = f"visual.blocks.{i}."
        shapes |= {
            b + "norm1.weight": (vd,),
            b + "norm2.weight": (vd,),
            b + "attn.qkv.weight": (3 * vd, vd),
            b + "attn.qkv.bias": (3 * vd,),
            b + "attn.proj.weight": (vd, vd),
            b + "attn.proj.bias": (vd,),
            b + "mlp.gate_proj.weight": (vi, vd),
            b + "mlp.gate_proj.bias": (vi,),
            b + "mlp.up_proj.weight": (vi, vd),
            b + "mlp.up_proj.bias": (vi,),
            b + "mlp.down_proj.weight": (vd, vi),
            b + "mlp.down_proj.bias": (vd,),
        }
    shapes |= {
        "visual.merger.ln_q.weight": (vd,),
        "visual.merger.mlp.0.weight": (4 * vd, 4 * vd),
        "visual.merger.mlp.0.bias": (4 * vd,),
        "visual.merger.mlp.2.weight": (d, 4 * vd),
        "visual.merger.mlp.2.bias": (d,),
    }
    return shapes


def test_4b_on_meta_has_the_official_keys_shapes_and_size():
    config = InfiniteVLConfig()  # defaults are the 4B release
    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(config)
    state = {to_disk_name(k): tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert state == official_4b_shapes()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert round(total / 1e9, 2) == 4.41
    assert round((total - vision) / 1e9, 2) == 3.74 and round(vision / 1e9, 2) == 0.67
    assert config.text.layer_types.count("sliding_attention") == 9
