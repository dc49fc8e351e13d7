"""Which transformers class a MoE model (text, vision-language, encoder-decoder) is built with.

Calibration, packing and loading used to assume `AutoModelForCausalLM`; vision-language MoE models
(qwen3_vl_moe, glm4v_moe, ...) have no causal-LM class, and encoder-decoder ones (nllb-moe,
switch_transformers) are seq2seq. A checkpoint names its own class in `config.architectures`; a bare config
gets the first auto mapping that knows its model type, in the order of AUTO_ORDER. (Here in pack/ because
pack/ builds meta-device models too; it needs only transformers.)
"""

from __future__ import annotations

from typing import Any

import transformers

# Auto classes tried for a config without `architectures`, most specific generation head first.
AUTO_ORDER = ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM",
              "AutoModelForSeq2SeqLM", "AutoModelForTokenClassification", "AutoModel", "AutoBackbone")


def auto_model_class(config: Any) -> type:
    """The model class for `config`: its `architectures[0]` when transformers has it, else the first of
    AUTO_ORDER whose mapping has the model type.

    Raises:
        ValueError: no transformers class can build this config.
    """
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    order = AUTO_ORDER
    if getattr(config, "sub_configs", None) and "text_config" in config.sub_configs:
        # A composite (vision/audio + text) config: its causal-LM entry, where one exists, is the text-only class.
        order = AUTO_ORDER[1:3] + AUTO_ORDER[:1] + AUTO_ORDER[3:]
    for auto_name in order:
        auto = getattr(transformers, auto_name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    raise ValueError(f"no transformers model class for model type {config.model_type!r} "
                     f"(tried architectures={getattr(config, 'architectures', None)} and {', '.join(AUTO_ORDER)})")


def is_seq2seq(config: Any) -> bool:
    """Encoder-decoder models need `decoder_input_ids` beside `input_ids`."""
    return bool(getattr(config, "is_encoder_decoder", False))


__all__ = ["AUTO_ORDER", "auto_model_class", "is_seq2seq"]
