"""The device-mesh axis names that model code and the trainer share.

`data` and `fsdp` split the batch (and `fsdp` the weights too), `expert` splits the batch and
the mixture-of-experts weight stacks by expert (expert parallelism, `moe.routed_experts_sharded`),
`tensor` splits attention heads and MLP columns (Megatron style)."""
from __future__ import annotations

DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)   # the axes a batch's rows (and their tokens) are split over
