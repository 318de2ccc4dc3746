"""Float64 reference runs: how far a fast path's training steps land from exact arithmetic,
as a multiple of a plainer path's own distance, measured alongside on the same host.

Why such a bound holds on any host and thread count: float64 rounds 2^29 times finer than
fp32, so the float64 run stands in for the exact result, and each fp32 or bf16 path's
distance to it is that path's rounding, amplified by whatever the computation amplifies
(training-mode BatchNorm at initialisation does, up to 10^3 and more). The plain path runs
the same computation with the same kernels, instruction set and thread count, so its
distance carries the same amplification; a host whose kernels round differently moves
both distances together, while a wrong result moves one path only, and by far more than
rounding does. The factor a test allows says how differently the two paths round (the
same kernels in another order, kernels that sum differently, operands rounded to bf16).

Last, the float64 checks that two paths of one DenseNet compute the same thing: gradcheck,
and two SGD steps side by side.
"""

import copy
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# fp32's unit roundoff: the floor of any fp32 path's distance to float64 (one rounding of
# the result itself), so a quantity the plain path happens to get exact still has a bound.
FP32_EPS = torch.finfo(torch.float32).eps
# One computation done twice in float64 (other kernels, order, layout or tracing) differs
# by float64's rounding, 2^-53, times what the computation amplifies: for these models
# below 10^5 (test_bench's fast path test sees fp32 training steps amplify rounding up to
# 3*10^4 times), so 2^-30 of the result's size has 2^6 to spare on any host, and a real
# difference (another formula, a missed term) lands far above it.
SAME_IN_FLOAT64 = 2**-30
KINDS = ("loss", "logits", "update")


@dataclass(frozen=True)
class Path:
    """One way of running the model: the builder's keyword arguments (memory_efficient=True,
    ...), channels_last memory format, and autocast ("off" or "bf16", as engine.autocast)."""

    kwargs: dict = field(default_factory=dict)
    channels_last: bool = False
    amp: str = "off"


@dataclass
class Run:
    """What `steps` SGD steps gave, each step's in float64: the loss and logits, and how far
    each floating-point parameter and buffer moved (that step's update)."""

    losses: list[float]
    logits: list[Tensor]
    updates: list[dict[str, Tensor]]


@dataclass
class Distances:
    """One run's distance to the float64 run: each step's loss (absolute difference) and
    logits (norm of the difference), and each parameter's and buffer's update (norm of the
    difference); each with its fp32 floor, FP32_EPS times the float64 value's size."""

    quantities: dict[str, float]
    floors: dict[str, float]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """DenseNet's recipe (paper Sec. 4.2): SGD, lr 0.1, Nesterov momentum 0.9, decay 1e-4."""
    return torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, amp: str
) -> Tensor:
    """One SGD step as train.py takes it (engine.train_step with its loss scaler off: amp
    "off", "bf16" or "fp16"), in torch alone, so that the tests of the copyable files run on
    their own torch floor, which the trainer's modules need not import on. Detached logits."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    with nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype):
        out = model(x)
        loss = F.cross_entropy(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return out.detach()


def run(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    amp: str = "off",
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
) -> Run:
    """`steps` train.py steps (train_step) of model on the batch (x, y); each step seeds
    torch's generator with its number, so dropout draws the same on every path."""
    opt = optimizer(model)
    result = Run([], [], [])
    for step in range(steps):
        before = {k: v.to(torch.float64, copy=True) for k, v in model.state_dict().items()
                  if v.is_floating_point()}  # fmt: skip
        torch.manual_seed(step)
        out = train_step(model, opt, x, y, amp).double()
        result.losses.append(F.cross_entropy(out, y).item())
        result.logits.append(out)
        after = model.state_dict()
        result.updates.append({k: after[k].double() - v for k, v in before.items()})
    return result


def distances(got: Run, want: Run) -> Distances:
    """How far run `got` is from run `want` (the float64 one), quantity by quantity, under
    keys "step {s} loss", "step {s} logits" and "step {s} update {name}"."""
    quantities, floors = {}, {}

    def add(key: str, a: Tensor | float, b: Tensor | float) -> None:
        quantities[key] = float(torch.as_tensor(a - b).norm())
        floors[key] = FP32_EPS * float(torch.as_tensor(b).norm())

    for step in range(len(want.losses)):
        add(f"step {step} loss", got.losses[step], want.losses[step])
        add(f"step {step} logits", got.logits[step], want.logits[step])
        for name, b in want.updates[step].items():
            add(f"step {step} update {name}", got.updates[step][name], b)
    return Distances(quantities, floors)


@dataclass
class Comparison:
    """Each path's distance to the float64 run, the plain fp32 path's under "fp32"."""

    reference: Run
    paths: dict[str, Distances]

    def ratios(self, name: str, baseline: str = "fp32") -> dict[str, float]:
        """Path `name`'s distance over path `baseline`'s (or its fp32 floor, if larger),
        quantity by quantity."""
        mine, base = self.paths[name].quantities, self.paths[baseline]
        return {k: d / max(base.quantities[k], base.floors[k]) for k, d in mine.items()}

    def assert_within(self, name: str, factor: float, baseline: str = "fp32",
                      steps: tuple[int, ...] | None = None, kinds: tuple[str, ...] = KINDS) -> None:  # fmt: skip
        """Path `name` is at most `factor` times as far from float64 as path `baseline`, in
        each quantity of `kinds` ("loss", "logits", "update") at `steps` (None: all); a
        failure names the quantities over the bound, worst first, with their ratios."""
        ratios = self.ratios(name, baseline)
        steps = range(len(self.reference.losses)) if steps is None else steps
        keys = [k for k in ratios if int(k.split()[1]) in steps and k.split()[2] in kinds]
        assert keys, "no quantity selected"
        over = sorted(((ratios[k], k) for k in keys if ratios[k] > factor), reverse=True)
        assert not over, f"{name}: over {factor} x {baseline}'s distance to float64: {over[:4]}"


def compare(
    build: Callable[..., nn.Module],
    x: Tensor,
    y: Tensor,
    steps: int,
    paths: dict[str, Path],
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] = sgd,
    channels_last: bool = False,
) -> Comparison:
    """Train copies of one model for `steps` steps on the batch (x, y): in float64 (the
    reference), plainly in fp32 (the baseline "fp32": build() as it is, no autocast), and
    along each of `paths`; every copy starts from the weights of the first build().

    build(**path.kwargs) returns a fresh fp32 model on x's device, the path's variant of
    it (memory_efficient=True, ...) with the same state_dict keys. x (fp32) and y are one
    batch; optimizer(model) gives each copy its optimizer (default sgd, DenseNet's
    recipe); channels_last: the memory format of the reference and of "fp32" (dropout
    draws its masks in memory order, so with dropout compare only runs in one format).
    Bound the result with assert_within(), or read ratios().
    """
    start = build().state_dict()

    def train(path: Path, dtype: torch.dtype) -> Run:
        model = build(**path.kwargs)
        model.load_state_dict(start)
        fmt = torch.channels_last if path.channels_last else torch.contiguous_format
        model = model.to(dtype).to(memory_format=fmt)
        batch = x.to(dtype).contiguous(memory_format=fmt)
        return run(model, batch, y, steps, path.amp, optimizer)

    plain = Path(channels_last=channels_last)
    reference = train(plain, torch.float64)
    measured = {name: distances(train(path, torch.float32), reference)
                for name, path in {"fp32": plain, **paths}.items()}  # fmt: skip
    return Comparison(reference, measured)


def assert_same_computation(got: Tensor, want: Tensor) -> None:
    """Two float64 results of one computation agree to SAME_IN_FLOAT64 of want's size."""
    assert got.dtype == want.dtype == torch.float64 and got.shape == want.shape
    error, size = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= SAME_IN_FLOAT64 * size, (
        f"differ by {error:.3g}, {error / size:.3g} of their size"
    )


def assert_forward_within(got: Tensor, model: nn.Module, x: Tensor, factor: float) -> None:
    """`got`, model(x) computed by another fp32 engine (onnxruntime, say), is at most
    `factor` times as far from the float64 output as eager fp32's own model(x) is (or its
    floor, FP32_EPS of the output's size). Leaves model as it was."""
    with torch.no_grad():
        fp32 = model(x).double()
        exact = copy.deepcopy(model).double()(x.double())
    floor = FP32_EPS * exact.norm().item()
    base = max((fp32 - exact).norm().item(), floor)
    error = (got.double() - exact).norm().item()
    assert error <= factor * base, f"{error / base:.3g} x eager fp32's distance to float64"


def assert_gradcheck(model: nn.Module) -> None:
    """torch.autograd.gradcheck of model's output against its input and every parameter."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))

    # float64 central differences with eps 1e-6: truncation ~eps^2 and rounding ~2^-53/eps,
    # both under 1e-9 before BN's amplification (below 10^5): within atol 1e-5 on any host
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """model(x), with the loss's gradients accumulated (no optimizer step)."""
    torch.manual_seed(seed)  # same dropout masks on both paths
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out


def assert_same_float64_steps(plain: nn.Module, other: nn.Module) -> None:
    """Two training steps of two float64 DenseNets of the same weights on one batch (the same
    dropout masks): outputs, accumulated gradients and buffers (running statistics, batches
    counted once a step)."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    # float64, the same computation: outputs within 1e-12 (2^-53 times little amplification),
    # gradients 1e-10 (BN's backward at initialisation amplifies up to 10^5: SAME_IN_FLOAT64)
    for step in range(2):
        a = _forward_backward(plain, x, y, step)
        b = _forward_backward(other, x, y, step)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, s), t in zip(plain.named_buffers(), other.buffers(), strict=True):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12, msg=name)
    for m in (plain, other):
        assert m.features.denseblock1.denselayer2.norm1.num_batches_tracked.item() == 2


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the activations autograd keeps for one backward of model(x): distinct
    storages, parameters excluded (DenseNet's parameter count itself grows quadratically
    with depth). The linear-memory tests and attic/memory_vs_depth.py measure with this."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())
