"""A stand-in for a CUDA graph on machines without one, shared by the sampler tests.

``capture()`` records the step function without running it and ``replay()`` runs it again: what a CUDA graph does,
as long as the step reads everything per-step from device buffers (a Python-side step value would be stale)."""


class EmulatedGraph:
    def __init__(self, device):
        self.fn = None

    def warmup(self, fn, times=2):
        for _ in range(times):
            fn()

    def capture(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()
