"""Data: calibration text for GPTQ, instruction data for finetuning, the pretraining corpus and bundled files."""
