"""Training shared by pre-training and distillation: pre-training the base CLIP (`pretrain`) and atomic, safe
checkpoints (`checkpoints`)."""
