"""The planner behind `vitdeep plan` (and the pre-flight check of `train`): will a run fit, how
long will it take, can each node feed its GPUs. It prices a *run plan* (`engine.run_plan`), never
starts one.

    cluster.py        the hardware a run is planned for, with its defaults (free of torch)
    memory.py         memory per GPU: model states per ZeRO stage, EMA, one traced micro-step
    trace.py          the fake-tensor trace of one micro-step (activations, gradients in flight)
    timing.py         step, epoch and total time at an MFU; images/s a node must decode
    input_verdict.py  input-bound or not: the node's cores × the per-core decoding rate
    report.py         the verdict: requested, largest micro-batch, cheapest change that fits
    measure.py        `plan --measure`: one real training step here, measured

The command itself (arguments → report → printed tables / JSON) is `vitdeep.commands.plan`.
"""
