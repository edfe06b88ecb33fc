"""Tensor parallelism's communication.

    parallel_state.py   the TP process group, all-reduce / all-gather / broadcast dispatch, free ports
    symm_all_reduce.py  one-/two-shot all-reduce over symmetric memory for decode-sized activations
"""
