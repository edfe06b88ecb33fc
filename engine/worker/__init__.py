"""One device's share of the model and what runs a step on it.

    worker.py        Worker: one tensor-parallel rank (device, model, KV cache shard), any transport
    model_runner.py  ModelRunner: per-step device inputs, forward pass, sampling
    paged_kv_cache.py   a model's paged KV cache: one allocation, a view per attention layer
    step_inputs.py   StepInputs (one step's device inputs), the host-side block table and pinned staging
    cuda_graphs.py   captured decode graphs for padded batch sizes
    verify_graphs.py captured verification graphs (1 + K rows per sequence) for padded batch sizes
    prompt_logprobs.py  the prompt tokens' logprobs from a prefill's logits
    sampler.py       temperature / top-k / top-p / min-p / penalties / seeds / logprobs
    step_profiler.py opt-in torch.profiler window over chosen steps
"""
