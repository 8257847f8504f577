"""The functions `litquant <job>` runs (and the scripts in generate/, finetune/, quantize/, pretrain/ call): typed
signatures that jsonargparse turns into flags, thin layers over the library."""
