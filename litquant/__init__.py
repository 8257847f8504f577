"""litquant: LLM quantization on PyTorch (bitsandbytes, GPTQ), LoRA/QLoRA finetuning and the `litquant` CLI."""
