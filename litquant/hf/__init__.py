"""Hugging Face <-> litquant conversion: config.json (`config`), weight names and layouts (`weights`), HF weight
files (`files`), the AutoGPTQ format (`gptq`) and the export of a litquant checkpoint (`export`). The jobs that
drive them are in `litquant/jobs/convert.py`; docs/ARCHITECTURE.md explains the layouts and the streaming."""
