"""The step loop of one chunk, and its CUDA-graph capture.

``cuda_graph=True`` captures one whole step (model call(s), reductions and launches) per chunk, after a warm-up on a
side stream, and replays it with the step index copied into a device buffer: everything per-step is computed on the
device from that buffer; nothing is a Python scalar frozen into the graph except the chunk's global sample offset
(hence one capture per chunk). Steps a method marks as not graphable (the ODE's last, Euler, step) run eagerly. A
multistep solver cycles through ring buffers (``Plan.phases`` arrangements): one graph per arrangement, captured
when it first comes up, all in one memory pool.
"""

from __future__ import annotations

import torch

from .plan import Chunk, Plan

__all__ = ["CudaGraph", "run_chunk", "check_graph_support"]


def check_graph_support(device: torch.device, fused: bool) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True captures the step loop in a CUDA graph and needs a CUDA device, got "
                         f"device={str(device)!r}")
    if not fused:
        raise ValueError("cuda_graph=True runs the fused kernel: it needs backend='triton' or 'auto' and a "
                         "float16/bfloat16/float32 dtype (the eager backends are not captured)")


class CudaGraph:
    """One captured sampler step: warm-up on a side stream (on a scratch copy of the chunk, so the state is not
    touched), capture of ``fn()`` (the model call(s) and launches of one step, reading the step from ``i_buf``), and
    replay. Per-chunk: the chunk's global sample offset is a launch argument, frozen into the graph."""

    def __init__(self, device):
        self.device = device
        self.graph = None
        self.result = None
        self.pool = None

    def share_pool(self, other: "CudaGraph"):
        """Capture into ``other``'s memory pool (graphs replayed one after the other, in capture order, may share
        one: the multistep solvers' per-phase graphs then hold one set of model temporaries, not one per phase)."""
        self.pool = other.graph.pool()

    def warmup(self, fn, times: int = 2):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(times):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)

    def capture(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.result = fn()
        return self.result

    def replay(self):
        self.graph.replay()
        return self.result


GRAPH_IMPL = CudaGraph        # tests on machines without a GPU swap in an emulator of capture/replay


def _capture(plan: Plan, ch: Chunk, i_buf, i: int, want_x0: bool, phase: int, share=None):
    """A graph of the step at row ``i`` (already in ``i_buf``) in buffer arrangement ``phase``: warmed up on a
    scratch copy of the chunk, then captured (sharing ``share``'s memory pool when given: the phases' graphs are
    replayed in the order they were captured, one after the other)."""
    graph = GRAPH_IMPL(plan.device)
    if share is not None and hasattr(graph, "share_pool"):
        graph.share_pool(share)
    warm = ch.clone()                      # dropped on return: the warm-up does not keep its function
    graph.warmup(lambda: plan.step(warm, i_buf, i, want_x0, phase))
    graph.capture(lambda: plan.step(ch, i_buf, i, want_x0, phase))
    return graph


def run_chunk(plan: Plan, n: int, offset: int, *, callback, bar, cuda_graph: bool, check_finite: bool = False):
    """Samples ``offset .. offset + n − 1``: x_T, then the N steps (rows N − 1 … 0), returning the chunk's x.
    Step pos runs buffer arrangement pos % plan.phases (1 but for the multistep solvers' ring buffers); with
    ``cuda_graph`` each arrangement gets its graph, captured when it first comes up."""
    ch = Chunk(plan, n, offset)
    i_buf = torch.zeros(1, dtype=torch.int64, device=plan.device)
    want_x0 = callback is not None
    order = list(range(plan.N - 1, -1, -1))
    period = plan.phases
    graphs: dict = {}
    for pos, i in enumerate(order):
        phase = pos % period
        i_buf.fill_(i)
        if cuda_graph and plan.graphable(i):
            graph = graphs.get(phase)
            if graph is None:
                graph = graphs[phase] = _capture(plan, ch, i_buf, i, want_x0, phase,
                                                 share=next(iter(graphs.values()), None))
            x0 = graph.replay()
        else:
            x0 = plan.step(ch, i_buf, i, want_x0, phase)
        if check_finite and not bool(torch.isfinite(ch.x).all()):     # opt-in: one host sync per step
            bad = int((~torch.isfinite(ch.x)).sum())
            raise FloatingPointError(
                f"a non-finite value first appeared at step {pos} of {plan.N} (respaced index {i}, training timestep "
                f"{plan.timesteps[i]}) in samples {offset}..{offset + n - 1}: {bad} non-finite elements "
                f"(method={plan.opts.method!r})")
        if callback is not None:
            callback(pos, plan.timesteps[i], ch.x, x0)
        if bar is not None:
            bar.update(1)
    return ch.x
