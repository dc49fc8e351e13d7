"""Tiny configs for any transformers MoE model type, by shrinking its default config.

Every size-like attribute of the config and of its sub-configs (text, vision, audio, ...) is set to a small
value; lists with one entry per layer are cut to the new layer count; token ids are moved inside the small
vocabulary. Families whose defaults need more than that get a few extra attributes in `OVERRIDES`
(documented there, one reason per line). The result is checked by the census: a config that still does not
build is reported as "cannot be built tiny" with the error.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 384
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16

SIZES: dict[str, int] = {
    # widths
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN, "d_embed": HIDDEN,
    "intermediate_size": 96, "ffn_dim": 96, "d_ff": 96, "ffn_hidden_size": 96, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96,
    "moe_intermediate_size": 32, "expert_intermediate_size": 32, "moe_ffn_hidden_size": 32, "ffn_dim_per_expert": 32,
    "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32, "expert_dim": 32,
    "out_hidden_size": HIDDEN, "projection_dim": HIDDEN, "output_dim": HIDDEN, "text_hidden_size": HIDDEN,
    "vision_output_dim": HIDDEN, "projector_hidden_size": HIDDEN, "adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN,
    "adapter_input_size": HIDDEN,
    # depth
    "num_hidden_layers": 2, "num_layers": 2, "n_layers": 2, "n_layer": 2, "depth": 1, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2, "num_encoder_layers": 2,
    # attention
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS, "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS, "head_dim": HEAD_DIM, "d_kv": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": HEAD_DIM,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "o_lora_rank": 16,
    "linear_head_dim": 16, "linear_num_heads": 4, "projection_intermediate_size": 96,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_num_heads": 4, "mamba_head_dim": 16, "ssm_state_size": 8, "mamba_d_state": 8, "state_size": 8,
    "n_groups": 1, "mamba_n_groups": 1, "time_step_rank": 8, "mamba_dt_rank": 8, "chunk_size": 16,
    # experts
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8, "num_experts_per_tok": 2,
    "n_group": 1, "topk_group": 1, "expert_capacity": 64,
    # vocab / positions
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "max_position_embeddings": 512, "num_expert_group": 2,
    # vision towers: small, only built (calibration runs text)
    "image_size": 32, "patch_size": 8, "num_channels": 3,
}
SCALE_DOWN_ONLY = {"encoder_sparse_step": 2, "decoder_sparse_step": 2, "num_experts_per_tok": 2, "moe_k": 2, "top_k": 2, "moe_topk": 2, "num_key_value_heads": 2, "num_kv_heads": 2, "n_shared_experts": 1, "num_shared_experts": 1,
                   "first_k_dense_replace": 1, "moe_layer_start_index": 1, "num_nextn_predict_layers": 0,
                   "mtp_num_hidden_layers": 0, "num_mtp_layers": 0}
EXPERT_COUNTS = {"num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
                 "num_experts_per_tok": 2}
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "num_decoder_layers", "decoder_layers")

# Extra attributes where shrinking alone does not give a buildable MoE model; each line says why.
OVERRIDES: dict[str, dict[str, Any]] = {
    "flint": {"mlp_only_layers": [0]},  # the default lists every layer as dense
    "dots1": {"n_shared_experts": 1},  # the default has None, which its MoE block multiplies
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # default None / 2 dense layers
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse"]},  # default None
    "step3p7": {"text_config.sliding_window": 64},  # default None, but its model builds a sliding mask anyway
    "zaya": {"num_experts_per_tok": 1},  # its config validator allows top-1 only
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    # NoPE attention: no rotary part in q/k
    "glm5_next": {"text_config.qk_rope_head_dim": 0, "text_config.head_dim": 0, "text_config.qk_nope_head_dim": 16,
                  "text_config.qk_head_dim": 16},
    # the multimodal rotary sections must sum to half the rotary width (head_dim * partial_rotary_factor)
    "glm4v_moe": {"text_config.rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                  "rope_type": "default", "mrope_section": [1, 1, 2]}},
    "ernie4_5_vl_moe": {"text_config.rope_parameters": {"rope_theta": 500000.0, "rope_type": "default",
                                                        "mrope_section": [3, 3, 2]},
                        "text_config.moe_intermediate_size": [32, 32]},
    # MoE is off by default (dense gemma): switch the MoE block on
    "gemma4": {"text_config.enable_moe_block": True, "text_config.num_experts": 8, "text_config.top_k_experts": 2,
               "text_config.moe_intermediate_size": 32},
    "diffusion_gemma": {"text_config.enable_moe_block": True, "text_config.num_experts": 8,
                        "text_config.top_k_experts": 2, "text_config.moe_intermediate_size": 32},
    "nemo_speechlm": {"text_config.layers_block_type": ["moe", "full_attention"]},
    "dots3_note": {"text_config.head_dim": 16},  # its sliding layers' head_dim is qk_nope + qk_rope
    "vitpose_backbone": {"out_features": ["stage2"], "out_indices": [2]},  # the default names stage 12
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},  # defaults its attention cannot run
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 16, "layer_types": ["linear_attention", "full_attention"]},
    "qwen4_exp": {"text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1, "text_config.indexer_head_dim": 16,
                  "text_config.indexer_budget": 8, "text_config.indexer_compress_ratio": 4},  # its indexer needs them
    "qwen3_omni_moe": {"talker_config.text_config.shared_expert_intermediate_size": 32,
                       "talker_config.spatial_merge_size": 2},  # both missing from the default talker config
}


def _shrink_rope(value: Any, head_dim: int) -> Any:
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if isinstance(value.get("partial_rotary_factor"), float):
        head_dim = int(head_dim * value["partial_rotary_factor"])
    for key in ("mrope_section", "mrope_sections"):
        section = value.get(key)
        if isinstance(section, list) and section and all(isinstance(s, int) for s in section):
            half = head_dim // 2
            n = len(section)
            value[key] = [half // n + (1 if i < half % n else 0) for i in range(n)]
    return value


def _shrink(config: PretrainedConfig, depth: int = 0) -> None:
    old_layers = next((vars(config)[k] for k in LAYER_COUNT_KEYS if isinstance(vars(config).get(k), int)), None)
    attrs = dict(vars(config))
    heads = attrs.get("num_attention_heads")
    multi_head = isinstance(heads, int) and attrs.get("num_key_value_heads") == heads
    for key, value in attrs.items():
        if key.startswith("_"):
            continue
        if isinstance(value, PretrainedConfig):
            _shrink(value, depth + 1)
        elif isinstance(value, bool):
            continue
        elif key in EXPERT_COUNTS and (value is None or value == 0):
            setattr(config, key, EXPERT_COUNTS[key])  # a dense default (flint, dots1): make it MoE
        elif key in SIZES and isinstance(value, int):
            setattr(config, key, SIZES[key])
        elif key in SCALE_DOWN_ONLY and isinstance(value, int):
            setattr(config, key, min(value, SCALE_DOWN_ONLY[key]))
        elif key.endswith("_hidden_size") and isinstance(value, int) and "intermediate" not in key:
            setattr(config, key, HIDDEN)
        elif key == "per_layer_config" and isinstance(value, dict):
            pass  # cut below, once the new layer count is known
        elif key in ("depths",) and isinstance(value, (list, tuple)):
            setattr(config, key, type(value)([1] * len(value)))
        elif key == "hidden_sizes" and isinstance(value, (list, tuple)):
            setattr(config, key, type(value)([32] * len(value)))
    per_layer = attrs.get("per_layer_config")
    if isinstance(per_layer, dict):  # heterogeneous layers (gemma4, dots3_note): keep those that still exist
        n = next((vars(config)[k] for k in LAYER_COUNT_KEYS if isinstance(vars(config).get(k), int)), 0)
        config.per_layer_config = {k: v for k, v in per_layer.items() if int(k) < n}
    if multi_head:
        config.num_key_value_heads = vars(config)["num_attention_heads"]  # multi-head models (MLA) stay multi-head
    new_layers = next((vars(config)[k] for k in LAYER_COUNT_KEYS if isinstance(vars(config).get(k), int)), None)
    if old_layers and new_layers and new_layers < old_layers:
        for key in attrs:
            value = vars(config)[key]  # as shrunk above (hidden_sizes, depths)
            pattern = isinstance(value, str) and any(w in key for w in ("pattern", "layer", "block"))
            if (isinstance(value, (list, tuple)) or pattern) and len(value) == old_layers and not key.startswith("_"):
                setattr(config, key, _cut_per_layer(value, new_layers))
    if isinstance(vars(config).get("qk_rope_head_dim"), int):  # MLA: rotary width is qk_rope_head_dim
        if "head_dim" in vars(config):  # head_dim was either the rotary part or the whole q/k head
            whole = attrs.get("head_dim") == attrs["qk_rope_head_dim"] + (attrs.get("qk_nope_head_dim") or 0)
            config.head_dim = config.qk_rope_head_dim + (config.qk_nope_head_dim or 0 if whole else 0)
        if "qk_head_dim" in vars(config):
            config.qk_head_dim = config.qk_rope_head_dim + (vars(config).get("qk_nope_head_dim") or 0)
    if vars(config).get("head_dim", 0) is None and "num_attention_heads" in vars(config):
        config.head_dim = HEAD_DIM  # hunyuan_v1_moe's default leaves it None and its attention needs it
    head_dim = vars(config).get("head_dim") or HEAD_DIM
    if "partial_rotary_factor" in vars(config) and isinstance(config.partial_rotary_factor, float):
        head_dim = int(head_dim * config.partial_rotary_factor)
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(getattr(config, key, None), dict):
            setattr(config, key, _shrink_rope(getattr(config, key), head_dim))
    vocab = vars(config).get("vocab_size")
    if isinstance(vocab, int):
        _fit_token_ids(config, vocab)


def _cut_per_layer(value: "list | str", n: int) -> "list | str":
    """Keep the first n entries, but make sure every kind of layer the full list has (dense, MoE, attention
    types) still appears when there is room: take one of each kind first, then fill in order."""
    picked = [value.index(k) for k in dict.fromkeys(value)][:n]
    picked += [i for i in range(len(value)) if i not in picked][: n - len(picked)]
    cut = [value[i] for i in sorted(picked)]
    return "".join(cut) if isinstance(value, str) else type(value)(cut)


def _fit_token_ids(config: PretrainedConfig, vocab: int) -> None:
    taken = set()
    spare = vocab - 1
    for key, value in list(vars(config).items()):
        if key.endswith(("_token_id", "_token_index", "_id")) and isinstance(value, int) and not isinstance(value, bool):
            if value >= vocab or value in taken:
                while spare in taken:
                    spare -= 1
                setattr(config, key, spare)
                value = spare
            taken.add(value)
        elif key.endswith("_token_id") and isinstance(value, list):
            setattr(config, key, [v if v < vocab else vocab - 1 for v in value])


# Model types built from one of their sub-configs instead, and why.
BUILD_AS: dict[str, tuple[str, str]] = {
    "qwen3_omni_moe": ("qwen3_omni_moe_thinker", "Qwen3OmniMoeForConditionalGeneration has no forward (generation "
                       "only); its thinker, which holds the MoE language model, is built instead"),
    "llama4": ("llama4_text", "Llama4ForConditionalGeneration's forward without images reads `outputs.image_outputs`, "
               "which its language model does not return (transformers 5.24): built as Llama4ForCausalLM"),
}


def tiny_config(model_type: str) -> PretrainedConfig:
    """The model type's default config (or BUILD_AS's sub-config type), shrunk (see the module docstring)."""
    config = CONFIG_MAPPING[BUILD_AS.get(model_type, (model_type,))[0]]()
    _shrink(config)
    for key, value in OVERRIDES.get(model_type, {}).items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = getattr(target, p, None)
        if target is not None:  # (a BUILD_AS sub-config lacks its parent's other sub-configs)
            setattr(target, leaf, copy.deepcopy(value))
    # Re-validate through the class (derived attributes, e.g. layer_types from counts).
    return type(config).from_dict(_drop_missing_layers(config.to_dict()))


def _drop_missing_layers(data: Any) -> Any:
    """Per-layer overrides (`per_layer_config`, keyed by layer index) of layers the tiny model no longer has."""
    if isinstance(data, dict):
        out = {k: _drop_missing_layers(v) for k, v in data.items()}
        n = next((data[k] for k in LAYER_COUNT_KEYS if isinstance(data.get(k), int)), None)
        if isinstance(out.get("per_layer_config"), dict) and n is not None:
            out["per_layer_config"] = {k: v for k, v in out["per_layer_config"].items() if int(k) < n}
        return out
    return data
