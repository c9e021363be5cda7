"""The models: the decoder-only LM (`decoder`, with DeepSeek's latent attention in
`latent_attention` and RoPE/YaRN and RMSNorm in `rotary` and `normalization`), the T5-style
encoder–decoder (`encoder_decoder`), and the factory that builds either from a config
(`factory`).

The factory's names are re-exported here, so `from switchmoe.models import build_model` reads
as what it is: the model of a config.
"""

from switchmoe.models.factory import (  # noqa: F401  (re-exported)
    MODEL_INPUTS,
    abstract_params,
    build_model,
    count_params,
    dummy_inputs,
    init_rows,
    is_routed_expert_param,
    model_inputs,
    model_masks,
    resolve,
    routed_expert_share,
    sequence_lengths,
)
