"""Replay a model's forward as a CUDA graph, one capture per input shape.

At batch 1 the tokenizer's Q-Former is hundreds of small kernels whose launch cost exceeds their
math; a CUDA graph replays them with one launch. Graphs read the parameters by address, so in-place
weight updates are seen by later replays; anything that re-allocates parameters (`.to()`,
assigning new tensors) needs `reset()`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch


class GraphedForward:
    """fn(x) -> tensor or tuple of tensors, captured per (shape, dtype, device) of x.

    max_graphs: captures kept (least recently used dropped first); each holds its own static input
    and outputs. prepare() runs before each replay. Outputs are cloned out of the graph's static buffers
    unless clone_outputs=False (then they are overwritten by the next replay of the same shape).
    max_batch: inputs with more rows than this run eagerly (where launches no longer dominate).
    capture_after: eager calls of a shape before it is captured (0: capture on first use; 1 keeps a
    one-off call from paying for warm-up and capture). A capture that fails warns once and leaves
    this forward eager. CPU inputs, and calls inside someone else's capture, just call fn.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        prepare: Callable[[], None] | None = None,
        warmup: int = 2,
        max_graphs: int = 8,
        clone_outputs: bool = True,
        max_batch: int | None = None,
        capture_after: int = 0,
    ):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        if capture_after < 0:
            raise ValueError(f"capture_after must be >= 0, got {capture_after}")
        self.fn = fn
        self.prepare = prepare  # run before every replay (e.g. refresh caches the graph reads)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self.max_batch = max_batch
        self.capture_after = capture_after
        self.disabled_reason: str | None = None  # set when a capture failed: then always eager
        self._graphs: OrderedDict = OrderedDict()
        self._seen: dict = {}
        self._pool = None

    def reset(self) -> None:
        """Drop every capture (call after parameters were re-allocated, e.g. by `.to()`)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def __getstate__(self):  # copies and pickles carry no captures (they hold device memory)
        state = dict(self.__dict__)
        state.update(_graphs=OrderedDict(), _seen={}, _pool=None)
        return state

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def wants_graph(self, key: tuple, batch: int) -> bool:
        """Whether a call with this key and batch size replays (or captures) a graph; counts the
        eager calls of shapes not captured yet."""
        if self.disabled_reason is not None or (self.max_batch is not None and batch > self.max_batch):
            return False
        if key in self._graphs:
            return True
        seen = self._seen.get(key, 0)
        if seen < self.capture_after:
            if len(self._seen) > 4 * self.max_graphs:
                self._seen.clear()  # many one-off shapes: forget them rather than grow
            self._seen[key] = seen + 1
            return False
        return True

    def __call__(self, x: torch.Tensor):
        if not x.is_cuda or torch.cuda.is_current_stream_capturing():
            return self.fn(x)  # inside someone's capture: just record the ops there
        key = (tuple(x.shape), x.dtype, x.device)
        if not self.wants_graph(key, x.shape[0] if x.dim() else 1):
            return self.fn(x)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x)
            except RuntimeError as err:  # e.g. an op that cannot be captured: stay eager from now on
                self.disabled_reason = f"CUDA graph capture failed: {str(err).splitlines()[0]}"
                warnings.warn(f"{self.disabled_reason}; running eagerly", RuntimeWarning, stacklevel=2)
                self.reset()
                return self.fn(x)
            self._graphs[key] = entry
            self._seen.pop(key, None)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        if self.prepare is not None:
            self.prepare()
        static_in.copy_(x)
        graph.replay()
        if not self.clone_outputs:
            return static_out
        if isinstance(static_out, torch.Tensor):
            return static_out.clone()
        return tuple(t.clone() for t in static_out)

    def _capture(self, x: torch.Tensor):
        static_in = x.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capture: allocator, cuBLAS handles, Triton JIT
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.fn(static_in)
        return graph, static_in, static_out
