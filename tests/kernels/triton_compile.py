"""Compiles Triton kernels for real GPUs on a machine without one (tests/kernels/test_compile.py says why).

`compile_launches(launches, archs)` runs, in a subprocess without TRITON_INTERPRET, the Python code
`launches` with every Triton launch replaced by a compile to a cubin for each architecture in
`archs` (Triton's bundled ptxas), and returns the set of "kernel@sm_NN" compiled, or None when
Triton's internals (the launch binder) have moved. `launches` may call `attention_metadata(query_lens,
seq_lens)` for a batch's attention metadata.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Optional

HARNESS = textwrap.dedent('''
    import sys
    import torch
    try:
        import triton.runtime.jit as jit
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile, make_backend
        jit.create_function_from_signature, jit.JITFunction._pack_args
    except (ImportError, AttributeError) as error:
        print("SKIP", error)
        sys.exit(0)

    compiled = []

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = False
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        for arch in ARCHS:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            binder = jit.create_function_from_signature(self.signature, self.params, backend)
            bound_args, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(
                backend, kwargs, bound_args, specialization, options)
            kernel = compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
            assert kernel.asm["cubin"], (self.__name__, arch)
            compiled.append(f"{self.__name__}@sm_{arch}")

    jit.JITFunction.run = compile_instead_of_launch

    def attention_metadata(query_lens, seq_lens):
        """A batch's AttentionMetadata for attention launches: zero slots and block tables (compiling
        reads shapes and dtypes only)."""
        from pagoda.kernels.metadata import AttentionMetadata

        qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(query_lens).cumsum(0)
        return AttentionMetadata(
            slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.int64), query_start_loc=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.zeros(len(seq_lens), 64, dtype=torch.int32),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
''')


def compile_launches(launches: str, archs: tuple[int, ...]) -> Optional[set[str]]:
    script = f"ARCHS = {archs!r}\n" + HARNESS + textwrap.dedent(launches) + \
        '\nprint("COMPILED", " ".join(sorted(set(compiled))))\n'
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    return None if last.startswith("SKIP") else set(last.split()[1:])
