"""How the model is spread over the ranks: one strategy per kind of parallelism, behind one small
interface (plain torch, no Ray; runs in a Ray Train worker or in any torch process with torchrun-style
ranks, or in one process with no process group at all).

The engine holds a `Strategy` and never asks which one. A strategy:

- `wrap`s the model for the ranks (and moves it to the device);
- runs the forward and backward passes of one optimizer step's micro-batches (`forward_backward`),
  synchronizing gradients only once, after the last;
- clips the gradients by their global norm, however they are laid out over the ranks;
- gives the model's and the optimizer's full state, and loads it back.

`ddp.DDPStrategy` replicates the model (PyTorch's DistributedDataParallel). Sharded strategies (FSDP2,
tensor and pipeline parallelism) implement the same protocol.

`build.build_strategy` picks the strategy a config names. This package's `__init__` imports nothing, so
that reading a config (`parallel.config`) costs no torch import: Ray's controller and helper actors
unpickle configs and never train.
"""
