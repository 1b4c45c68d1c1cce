"""Model organisms: narrow datasets, persona prompting, LoRA finetuning, the default suite."""
