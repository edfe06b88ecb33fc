"""Quantized weights: what a checkpoint's (or `--quantization`'s) scheme is, and how each linear
layer stores and multiplies by its weight.

    base.py                QuantizationConfig (a model's scheme) and LinearMethod (one layer's weight:
                           its parameters, their TP layout, loading, apply); the unquantized method
    registry.py            --quantization and the checkpoint's quantization_config -> one QuantizationConfig
    fp8.py                 FP8 W8A8 (e4m3): quantized at load, or a `quant_method: fp8` checkpoint
    compressed_tensors.py  llm-compressor's checkpoints (read with the compressed-tensors library):
                           FP8 W8A8 and, through weight_only.py, pack-quantized INT4/INT8
    weight_only.py         W4A16 / W8A16 in kernels/weight_only.py's group-quantized format
    gptq.py, awq.py        the GPTQ and AWQ checkpoint layouts, converted to that format at load
    gguf.py                a GGUF file's Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks, kept quantized (same format)
    mxfp4.py               gpt-oss's MXFP4 expert weights, dequantized to the model dtype at load

The FP8 KV cache is the cache's business (engine/config.py CacheConfig.kv_cache_dtype,
layers/attention.py scales, kernels/kv_quant.py).
"""
