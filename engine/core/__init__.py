"""The engine core: requests, the scheduler, the paged KV cache manager and the step loop.

    request.py       Request: one sequence's tokens, counters and stop rules
    kv_cache.py      BlockPool + KVCacheManager: paged blocks, prefix hashing and reuse
    scheduler.py     Scheduler: token budget, chunked prefill, admission policy, preemption
    engine_core.py   EngineCore: add / abort / step, and the command loop every transport runs
    commands.py      the typed commands a client sends the loop and the events it answers with
    core_thread.py   transport: the loop on a thread of the serving process
    core_process.py  transport: the loop in a process of its own
    idle_watch.py    what both transports add: while the loop idles, a look at the executor

Token ids only: no text, no tokenizer, no Ray.
"""
