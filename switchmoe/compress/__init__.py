"""Making a trained MoE smaller: int8 experts (`quantization`) and expert merging (`merging`);
distillation trains a student (switchmoe/training/distillation.py)."""
