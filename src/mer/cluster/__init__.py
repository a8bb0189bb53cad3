"""Experts sharded over several processes or machines, on Ray (`pip install mer[cluster]`).

The head (the process that called `mer.open(..., cluster=...)`) keeps the dense weights,
attention, the KV cache and the scheduler; each expert worker (`worker.ExpertWorker`, a
Ray actor) owns a disjoint set of experts (`placement`) with its own store, RAM cache,
read engine and prefetch. Per MoE layer the head sends each worker owning some of the
layer's chosen experts one call with its tokens (`head.ClusterExperts.moe`), the calls
to different workers in flight together, and sums what comes back in the order the
single process sums, so the output does not depend on how many workers there are.
Nothing here is imported unless a cluster is asked for: Ray stays optional.
"""
