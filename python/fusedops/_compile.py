"""Helpers for running under torch.compile."""


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo``.

    The public decorator imports torch._dynamo, which imports triton, and ``import fusedops``
    must not import triton: ``TRITON_INTERPRET`` has to be decided before triton loads. Dynamo
    reads the attribute the public decorator sets (tests/test_build.py checks that they agree
    on the installed torch), so setting it here has the same effect.
    """
    fn._dynamo_marked_constant = True
    return fn
