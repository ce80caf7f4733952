"""The package and the build: layout, the one loader of fusedops._C, the ops' schemas."""

import importlib
import importlib.util

import pytest
import torch

import fusedops
from fusedops import _extension
from fusedops.dispatch import attention_contract, contract, conv_contract, linear_contract

_C_BUILT = importlib.util.find_spec("fusedops._C") is not None


def test_triton_kernels_is_a_subpackage_of_fusedops():
    import fusedops.triton_kernels as kernels

    assert kernels.__name__ == "fusedops.triton_kernels"
    # Triton's own project uses the top-level name; we never install one.
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or "fusedops" not in str(spec.origin)


def test_public_api_names():
    for name in ("cross_entropy", "use_backend", "backends", "nn"):
        assert hasattr(fusedops, name), name
    assert issubclass(fusedops.nn.CrossEntropyLoss, torch.nn.CrossEntropyLoss)


def test_importing_fusedops_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, fusedops; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "False"], result.stdout


def test_our_constant_marker_is_the_one_torch_compile_reads():
    from fusedops._compile import assume_constant_result

    def ours():
        return 1

    def theirs():
        return 1

    torch.compiler.assume_constant_result(theirs)
    assume_constant_result(ours)
    assert vars(ours) == vars(theirs) and vars(theirs)


def test_importing_fusedops_does_not_build_or_need_a_gpu():
    reason = _extension.availability()
    if torch.cuda.is_available():
        return
    assert reason is not None and "CUDA" in reason


@pytest.mark.skipif(not _C_BUILT, reason="fusedops._C was not built ahead of time here")
def test_cuda_ops_match_the_contract_schemas():
    from fusedops.dispatch import cuda

    cuda.load()
    schemas = {**contract.SCHEMAS, **linear_contract.SCHEMAS, **attention_contract.SCHEMAS,
               **conv_contract.SCHEMAS}
    for op, schema in schemas.items():
        handle = getattr(torch.ops.fusedops, f"{op}_cuda").default
        declared = str(handle._schema)
        expected = f"fusedops::{op}_cuda{schema}"
        assert declared.replace(" ", "") == expected.replace(" ", ""), (declared, expected)


@pytest.mark.skipif(not _C_BUILT, reason="fusedops._C was not built ahead of time here")
def test_cuda_fakes_trace_on_meta_tensors():
    from fusedops.dispatch import cuda

    cuda.load()
    logits = torch.empty(7, 50257, dtype=torch.bfloat16, device="meta")
    target = torch.empty(7, dtype=torch.int32, device="meta")
    loss, lse = torch.ops.fusedops.ce_fwd_cuda(logits, target, None, -100, 0.0, 0.0, 0.0)
    assert loss.shape == lse.shape == (7,) and loss.dtype == torch.float32
    grad = torch.ops.fusedops.ce_bwd_cuda(logits, target, None, lse, loss, -100, 0.0, 0.0, 0.0)
    assert grad.shape == logits.shape and grad.dtype == logits.dtype
    x = torch.empty(9, 40, dtype=torch.bfloat16, device="meta")
    w = torch.empty(24, 40, dtype=torch.bfloat16, device="meta")
    out, saved = torch.ops.fusedops.linear_fwd_cuda(x, w, None, None, "gelu", False)
    assert out.shape == saved.shape == (9, 24) and out.dtype == torch.bfloat16
    grads = torch.ops.fusedops.linear_bwd_cuda(out, x, w, saved, "gelu", False, True, True, True,
                                               False)
    assert [tuple(g.shape) for g in grads] == [(9, 40), (24, 40), (24,), (0,)]
    q = torch.empty(2, 8, 100, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
    k = torch.empty(2, 2, 90, 128, dtype=torch.bfloat16, device="meta")
    out, lse = torch.ops.fusedops.attention_fwd_cuda(q, k, k, None, None, 100, 90, 0.1, 2**30,
                                                     0, False)
    assert out.shape == q.shape and out.stride() == q.stride() and lse.shape == (2, 100, 8)
    grads = torch.ops.fusedops.attention_bwd_cuda(out, q, k, k, out, lse, None, None, 100, 90,
                                                  0.1, 2**30, 0, False, False)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    x = torch.empty(2, 16, 9, 9, dtype=torch.bfloat16, device="meta")
    w = torch.empty(32, 16, 3, 3, dtype=torch.bfloat16, device="meta")
    out, saved = torch.ops.fusedops.conv2d_fwd_cuda(x, w, None, None, 2, 2, 1, 1, 1, 1, 5, 5, 1,
                                                    "silu", True, False)
    assert out.shape == saved.shape == (2, 32, 5, 5)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not _C_BUILT, reason="fusedops._C was not built ahead of time here")
def test_build_info_names_the_arches():
    info = _extension.build_info()
    text = str(info)
    assert "sm_90a" in text and "sm_80" in text, info
