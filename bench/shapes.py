"""The named shape suite: the one list every benchmark, report and smoke test uses.

Read by the pytest-benchmark files in bench/, by ``fastconv bench`` (the wheel ships this file
as ``fastconv/_bench/shapes.py``) and by the tests' smoke runs. Plain data: it imports nothing
from fastconv or torch.

Shapes tagged ``smoke`` are tiny; ``select`` leaves them out unless asked for by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConvShape:
    """A conv2d layer: input (batch, cin, h, w), weight (cout, cin/groups, k, k)."""

    name: str
    cin: int
    cout: int
    hw: int
    k: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    batch: dict = field(default_factory=lambda: {"cpu": 8, "cuda": 32})
    tags: tuple = ()
    op = "conv2d"

    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1

    def flops(self, batch: int, passname: str = "fwd") -> int:
        """Multiply-adds x 2: forward, or x 3 for forward+backward (grad input, grad weight)."""
        fwd = 2 * batch * self.cout * self.out_hw() ** 2 * (self.cin // self.groups) * self.k ** 2
        return fwd * (3 if passname == "fwdbwd" else 1)

    def bytes(self, batch: int, itemsize: int = 4, passname: str = "fwd") -> int:
        """Bytes of input, weight and output touched once (the memory-traffic floor); the
        backward reads and writes each of them once more."""
        elems = (batch * self.cin * self.hw ** 2 + self.cout * self.cin // self.groups * self.k ** 2
                 + batch * self.cout * self.out_hw() ** 2)
        return elems * itemsize * (2 if passname == "fwdbwd" else 1)

    def describe(self) -> str:
        extra = "".join(f" {k}{v}" for k, v in (("s", self.stride), ("p", self.padding),
                                                  ("d", self.dilation), ("g", self.groups))
                        if v != (0 if k == "p" else 1))
        return f"{self.cin}->{self.cout} {self.hw}x{self.hw} k{self.k}{extra}"

    def options(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


CONV_SHAPES = [
    ConvShape("lenet-conv1", 1, 6, 28, 5, padding=2, batch={"cpu": 64, "cuda": 256}),
    ConvShape("lenet-conv2", 6, 16, 14, 5, batch={"cpu": 64, "cuda": 256}),
    ConvShape("resnet-stem-7x7s2", 3, 64, 224, 7, stride=2, padding=3),
    ConvShape("resnet-3x3-64", 64, 64, 56, 3, padding=1, tags=("resnet-3x3",)),
    ConvShape("resnet-1x1-256to64", 256, 64, 56, 1, tags=("resnet-1x1",)),
    ConvShape("resnet-3x3s2-128", 128, 128, 56, 3, stride=2, padding=1, tags=("resnet-3x3",)),
    ConvShape("resnet-3x3-256", 256, 256, 14, 3, padding=1, tags=("resnet-3x3",)),
    ConvShape("resnet-1x1-512to2048", 512, 2048, 7, 1, tags=("resnet-1x1",)),
    ConvShape("vgg-3x3-128", 128, 128, 112, 3, padding=1, batch={"cpu": 2, "cuda": 32}),
    ConvShape("depthwise-3x3-256", 256, 256, 28, 3, padding=1, groups=256),
    ConvShape("dilated-3x3-d2", 64, 64, 56, 3, padding=2, dilation=2),
    ConvShape("smoke-conv-3x3", 3, 4, 9, 3, padding=1, batch={"cpu": 2, "cuda": 2},
              tags=("smoke",)),
]


@dataclass(frozen=True)
class PoolShape:
    """A pooling layer over input (batch, c, hw, hw)."""

    name: str
    mode: str  # "max" or "avg"
    c: int
    hw: int
    k: int
    stride: int
    padding: int = 0
    batch: dict = field(default_factory=lambda: {"cpu": 32, "cuda": 32})
    tags: tuple = ()

    @property
    def op(self) -> str:
        return f"{self.mode}_pool2d"

    def flops(self, batch: int, passname: str = "fwd") -> None:
        return None  # memory-bound: rated in GB/s

    def describe(self) -> str:
        return f"{self.c}x{self.hw}x{self.hw} k{self.k} s{self.stride} p{self.padding}"

    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.k) // self.stride + 1

    def bytes(self, batch: int, itemsize: int = 4, passname: str = "fwd") -> int:
        """Bytes that must move at least. Forward: read the input, write the output.
        Forward+backward adds reading grad_output and writing grad_input. (What an
        implementation keeps between the passes, e.g. max pooling's argmax, is its own cost.)"""
        inp, out = batch * self.c * self.hw ** 2, batch * self.c * self.out_hw() ** 2
        return itemsize * (inp + out) * (2 if passname == "fwdbwd" else 1)

    def options(self) -> dict:
        return dict(kernel_size=self.k, stride=self.stride, padding=self.padding)


POOL_SHAPES = [
    PoolShape("maxpool-3x3s2-64x112", "max", 64, 112, 3, 2, padding=1),
    PoolShape("avgpool-2x2s2-64x56", "avg", 64, 56, 2, 2),
    # Stride 1 (Inception's pooling branches): not separable, so the tap-by-tap kernels.
    PoolShape("maxpool-3x3s1-64x56", "max", 64, 56, 3, 1, padding=1),
    PoolShape("smoke-maxpool-3x3s2", "max", 3, 9, 3, 2, padding=1,
              batch={"cpu": 2, "cuda": 2}, tags=("smoke",)),
    PoolShape("smoke-avgpool-2x2s2", "avg", 3, 8, 2, 2, batch={"cpu": 2, "cuda": 2},
              tags=("smoke",)),
]

# The seed lesson's edge detector ([1, -1] on one image), timed against the seed's own loop.
DEMO_IMAGE_SIZE = 256


def select(shapes, names: str | None = None):
    """Shapes whose name contains any of the comma-separated ``names``; with no names, every
    shape but the ``smoke`` ones, which are selected only by a name containing "smoke"."""
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted:
        return [s for s in shapes if "smoke" not in s.tags]
    # A smoke shape only when asked for as one ("smoke", "smoke-conv"), not via "pool".
    return [s for s in shapes if any(w in s.name and ("smoke" not in s.tags or "smoke" in w)
                                     for w in wanted)]
