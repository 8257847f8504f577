"""GGUF, the file format of llama.cpp and ollama, both ways: `read.import_gguf` dequantizes a .gguf into a litquant
checkpoint (weights, config, tokenizer files), `write.export_gguf` writes a litquant checkpoint as a .gguf that
llama.cpp loads. `arch` holds the per-architecture facts (metadata keys, tensor names, the q/k row order) and `vocab`
the tokenizer metadata <-> tokenizer.json. Both use the `gguf` package maintained with llama.cpp (extra `gguf`)."""
