"""Replay a model's forward as a CUDA graph, one capture per input shape.

At batch 1 the tokenizer's Q-Former is hundreds of small kernels whose launch cost exceeds their
math; a CUDA graph replays them with one launch. Graphs read the parameters by address, so in-place
weight updates are seen by later replays; anything that re-allocates parameters (`.to()`,
assigning new tensors) needs `reset()`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class GraphedForward:
    """fn(x) -> tensor or tuple of tensors, captured per (shape, dtype, device) of x on first use.

    max_graphs: captures kept (least recently used dropped first); each holds its own static input
    and outputs. prepare() runs before each replay. Outputs are cloned out of the graph's static buffers
    unless clone_outputs=False
    (then they are overwritten by the next replay of the same shape). CPU inputs just call fn.
    """

    def __init__(
        self,
        fn: Callable,
        *,
        prepare: Callable[[], None] | None = None,
        warmup: int = 2,
        max_graphs: int = 8,
        clone_outputs: bool = True,
    ):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.prepare = prepare  # run before every replay (e.g. refresh caches the graph reads)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self._graphs: OrderedDict = OrderedDict()
        self._pool = None

    def reset(self) -> None:
        self._graphs.clear()
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor):
        if not x.is_cuda:
            return self.fn(x)
        if torch.cuda.is_current_stream_capturing():
            return self.fn(x)  # already inside someone's capture: just record the ops there
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
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
