"""Training: loading the model (4-bit, LoRA), the collator, the trainer, a run's folder and signals, and what each
launch mode needs from a recipe."""
