"""From a model name or path to weights.

    model_source.py  resolves "default", a Hugging Face checkpoint directory, a .gguf file or a cached Hub id
    hub_cache.py     finds a Hub id ("org/name") in the local Hugging Face cache, offline
    weights.py       iterates (name, tensor) from safetensors or GGUF, slicing per TP rank
    gguf_cache.py    on-disk cache of what a GGUF file converts into (config, tokenizer)
    gguf_index.py    a GGUF file's tensor index, cached (GGUFReader parses the whole vocabulary first)
"""
