"""How the engine core reaches the model, whatever runs it.

    base.py       Executor (the interface the core calls) and WorkerGroupExecutor (one Worker per rank)
    uniproc.py    one ModelRunner in this process
    multiproc.py  one worker process per TP rank, over pipes
    factory.py    the executor class for a config's backend

A Ray executor (pagoda.cluster) drives the same Worker class as Ray actors.
"""
