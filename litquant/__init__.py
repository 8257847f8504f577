"""litquant: LLM quantization on PyTorch (bitsandbytes, GPTQ), LoRA/QLoRA finetuning and the `litquant` CLI.
`from litquant import LLM` is the Python API."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `litquant --help` and the scripts do not pay for torch here
    if name == "LLM":
        from litquant.api import LLM

        return LLM
    raise AttributeError(f"module 'litquant' has no attribute {name!r}")
