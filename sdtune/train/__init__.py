"""Training: the loop (accelerate), LoRA (peft), optimizers, checkpoints."""
