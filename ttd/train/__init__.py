"""Training: the recipe pre-training and distillation share (`recipe`: AdamW, parameter groups, schedule,
preprocessing), atomic checkpoints (`checkpoints`), pre-training the base CLIP (`pretrain`), and distillation's
losses (`distill_losses`) and data (`distill_data`); the `distill` stage itself is in `ttd.stages`."""
