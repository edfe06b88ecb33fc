"""Process-level helpers shared by the engine core's process and the TP workers.

    child_process.py  how a spawned child ended, leaving when the parent dies, stopping children
    gc_freeze.py      freezing the start-up heap out of garbage collection between steps
    startup_timeline.py  one log line per start-up phase: its duration and the time since the process began
"""
