"""torch.library custom ops of fastsd: schemas, fake kernels, and which kernel runs on which device.

Importing :mod:`fastsd.ops.distill` registers the loss ops; this package itself stays light so that
:mod:`fastsd.reference` can share the argument checks without registering anything.
"""
