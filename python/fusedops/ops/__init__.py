"""One module per op family: argument checks, the autograd.Function, the functional API."""
