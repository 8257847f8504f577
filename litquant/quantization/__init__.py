"""Quantization: the `--quantize` modes (modes.py), bitsandbytes (bnb*.py), GPTQ (gptq*.py) and the CPU kernels."""
