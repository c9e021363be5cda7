"""Other libraries' checkpoints in and out: Hugging Face Switch Transformers (`hf_switch`)."""
