"""Other libraries' checkpoints in and out: Hugging Face's layout (`hf` picks the converter by
model_type: `hf_switch` for Switch Transformers, `hf_decoders` for Mixtral, OLMoE, Qwen2-MoE and
Qwen3-MoE)."""
