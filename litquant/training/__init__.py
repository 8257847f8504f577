"""The finetuning trainer (LoRA/QLoRA and full finetuning), as library code; `litquant/jobs/finetune.py` is the CLI.

args: the --data/--train/--eval option groups. run: the run spec, its checks, strategies and Fabric launch.
methods: what LoRA and full finetuning train and save. data: encoding and resume-exact batching. optim: optimizer
and LR schedule. loop: `fit`. evaluation: validation loss, exact match, samples. state: full parameter/optimizer
state under FSDP. checkpoints: step checkpoints and --resume. loggers: TensorBoard/CSV. See docs/ARCHITECTURE.md.
"""
