"""The token-mean NLL as a hessian-eigenthings operator, and what its Krylov runs need around it.

* :class:`NLLProblem`: the prepared set-up every measurement shares (model, batches, weight space, operator
  kind), made once by :class:`landscape.curvature.Curvature`; its :meth:`~NLLProblem.operator` is the Hessian
  ``H = d2L/dw2`` (``"hessian"``) or the generalized Gauss-Newton ``G = J^T H_logits J`` (``"ggn"``) of the
  token-mean NLL ``L = sum_s S_s / N`` over all batches (nats/token per squared weight unit).
* :class:`CountedOperator`: enables autograd, detaches, counts and times products, advances a progress bar.
* The Krylov memory check (:func:`check_krylov_memory`) and the memory-mapped basis backend
  (:func:`krylov_backend`), for bases that do not fit in memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hessian_eigenthings import CurvatureOperator, GGNOperator
from hessian_eigenthings.linalg import SingleDeviceBackend
from torch import nn
from tqdm.auto import tqdm

from landscape.curvature.space import CurvatureError, OperatorKind, WeightSpace, check_curvature_model
from landscape.data import TokenSet
from landscape.memory import large_blocks_mapped, release_freed_memory
from landscape.objectives import nll_sums_from_logits, segment_nll_sums
from landscape.weights import model_label, weight_is_transposed, working_dtype

Batch = tuple[torch.Tensor, torch.Tensor]  # (tokens (b, t), score_mask (b, t))

# Share of the memory available when a Lanczos run starts that its vectors may use (the rest: the HVPs' work).
KRYLOV_MEMORY_SHARE = 0.8


# ------------------------------------------------------------------------------------------ batches
def token_batches(data: TokenSet, batch_size: int) -> list[Batch]:
    """A re-iterable list of ``(tokens (b, t), score_mask (b, t))`` batches (operators iterate it once per
    product)."""
    return list(data.batches(batch_size))


def scored_tokens(batches: list[Batch]) -> int:
    """Scored tokens of the batches: the ``N`` of the token mean (a segment's first token is not scored)."""
    return int(sum(int(mask[:, 1:].sum()) for _, mask in batches))


# ---------------------------------------------------------------------------------------- operators
def nll_operator(model: nn.Module, batches: list[Batch], loss_scale: float, space: WeightSpace,
                 kind: OperatorKind) -> CurvatureOperator:
    """Operator of ``loss_scale * sum of NLL sums``, averaged over ``batches`` as hessian-eigenthings does.

    With ``loss_scale = len(batches) / N`` the average is the curvature of the token-mean NLL over all
    batches; with one batch and ``loss_scale = 1`` it is that of the batch's summed NLL.
    """
    if kind == "hessian":
        return NLLHessianOperator(model, batches, loss_scale / len(batches), space)
    selected = set(space.parameter_names)

    def in_space(name: str, _param: nn.Parameter) -> bool:
        return name in selected

    def logits_of(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch[0]).logits  # (b, t, vocab)

    def scaled_nll_of_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return nll_sums_from_logits(logits, *batch).sum() * loss_scale

    return GGNOperator(model, batches, logits_of, scaled_nll_of_logits, param_filter=in_space)


# A product over at least this many bytes of weights maps its large blocks (memory.large_blocks_mapped):
# SmolLM2's (0.42 GB) then adds 1.02 GB instead of 1.64 GB for about 10 % more time, while a toy's product,
# milliseconds long, would spend a quarter more time in the mappings' system calls (tiny-gpt2: 3.84x one
# forward and backward against 3.01x) to save memory that does not matter.
MAPPED_PRODUCT_BYTES = 64 * 2**20


class NLLHessianOperator(CurvatureOperator):
    """``H v`` of ``scale * sum over batches of the summed NLL`` w.r.t. the weights of ``space``, in as little
    memory as a double backward allows.

    ``H v`` is the gradient of the directional derivative ``g . v`` (``v`` held fixed). The first backward
    does not form the weight gradient ``g`` (a space-sized vector with its graph): for a linear layer
    ``y = x W^T`` whose weight enters the loss through that layer alone, ``<dL/dW, V> = sum over tokens of
    <dL/dy, V x>``, so the first backward stops at the layers' outputs (activation-sized) and ``g . v`` is
    formed from them and the layers' inputs; a weight that another module also holds (tied to an embedding)
    gets its gradient directly instead. (A weight read outside its modules' forward calls would be missed;
    transformers' architectures do not do that.) The second backward accumulates, in place, into ``.grad``
    tensors that are views of the one flat output (each parameter's previous ``.grad`` is restored
    afterwards), or folds each weight's share into ``v^T H v`` (:meth:`quadratic_form`).
    hessian-eigenthings' ``HessianOperator`` computes the same products (to float rounding; the tests check
    it) with the weight gradient's graph and three more space-sized vectors, 0.4 GB each on SmolLM2's 106 M
    decoder weights: one product there adds 1.57 GB to the process, its vector included, against 2.00 GB
    through the weight gradient (``python -m bench.memory --worker hvp --model smollm2-135m --profile full``).
    """

    def __init__(self, model: nn.Module, batches: list[Batch], scale: float, space: WeightSpace) -> None:
        modules = dict(model.named_modules())
        self.model, self.batches, self.scale = model, batches, scale
        self.layers = [modules[layer] for layer in space.layers]
        self.params = [module.weight for module in self.layers]  # as stored (Conv1D: (in, out))
        holders = _parameter_holders(model)
        # a layer's weight used by no other module: g . v from the layer's output gradient and input
        self.through_output = [holders[id(p)] == 1 for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self._size = sum(self.sizes)
        # a product over this much weight maps its large blocks (see _second_backwards); a toy's does not
        self._maps_blocks = self._size * self.params[0].element_size() >= MAPPED_PRODUCT_BYTES

    @property
    def size(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat ``(size,)`` vector ``v`` (the space's order), ``(size,)``."""
        return self.matvec_into(v, torch.empty_like(v))

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``H v`` written into ``out`` (a contiguous ``(size,)`` tensor of ``v``'s dtype, not ``v``); returns
        ``out``."""
        if v.shape != (self._size,) or out.shape != (self._size,):
            raise ValueError(f"expected vectors of shape ({self._size},), got {tuple(v.shape)} and "
                             f"{tuple(out.shape)}")
        out.zero_()
        previous = [p.grad for p in self.params]
        try:
            for p, part in zip(self.params, out.split(self.sizes)):
                p.grad = part.view_as(p)  # the second backward adds into the output in place
            self._second_backwards(v)
        finally:
            for p, grad in zip(self.params, previous):
                p.grad = grad
        return out

    def quadratic_form(self, v: torch.Tensor) -> float:
        """``v^T H v`` for a flat ``(size,)`` vector ``v``, without a product vector: each layer's share of
        ``H v`` is folded into the sum and dropped as soon as the second backward has formed it (the memory of
        one layer's product instead of the space's)."""
        if v.shape != (self._size,):
            raise ValueError(f"expected a vector of shape ({self._size},), got {tuple(v.shape)}")
        if len({id(p) for p in self.params}) < len(self.params):  # a weight twice in the space
            return float(torch.dot(v, self.matvec(v)))
        tangents = {id(p): part.view_as(p) for part, p in zip(v.split(self.sizes), self.params)}
        shares: list[torch.Tensor] = []

        def fold(p: torch.Tensor) -> None:
            wide = working_dtype(p.dtype)  # a bf16 layer's share is reduced in float32
            share = torch.dot(p.grad.reshape(-1).to(wide), tangents[id(p)].reshape(-1).to(wide))
            shares.append(share.double())
            p.grad = None

        previous = [p.grad for p in self.params]
        handles = [p.register_post_accumulate_grad_hook(fold) for p in self.params]
        try:
            for p in self.params:
                p.grad = None
            self._second_backwards(v)
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(self.params, previous):
                p.grad = grad
        return float(torch.stack(shares).sum()) if shares else 0.0

    def _second_backwards(self, v: torch.Tensor) -> None:
        """For every batch, the backward pass of ``g . v``: each weight's share of ``H v`` reaches its
        ``.grad`` (and its post-accumulate hooks)."""
        tangents = [part.view_as(p) for part, p in zip(v.split(self.sizes), self.params)]
        # the blocks both backward passes free leave the process at once
        with large_blocks_mapped() if self._maps_blocks else contextlib.nullcontext():
            for tokens, mask in self.batches:
                directional = self._directional_derivative(tokens, mask, tangents)
                if directional is not None:
                    torch.autograd.backward(directional, inputs=self.params)
                del directional
                if self._maps_blocks:
                    release_freed_memory()  # what the heap served instead of mappings (a long run's heap)

    def _directional_derivative(self, tokens: torch.Tensor, mask: torch.Tensor,
                                tangents: list[torch.Tensor]) -> torch.Tensor | None:
        """``g . v`` of one batch's scaled NLL sum, with the graph to differentiate it again (float32 sum);
        ``None`` where no weight of the space reaches the loss."""
        calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.layers]

        def recorder(i: int):
            def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                calls[i].append((args[0], output))
            return hook

        hooks = [layer.register_forward_hook(recorder(i))
                 for i, (layer, through) in enumerate(zip(self.layers, self.through_output)) if through]
        try:
            loss = segment_nll_sums(self.model, tokens, mask).sum() * self.scale
        finally:
            for hook in hooks:
                hook.remove()
        direct = [i for i, through in enumerate(self.through_output) if not through]
        outputs = [(i, x, y) for i in range(len(self.layers)) for x, y in calls[i]]
        wrt = [y for _, _, y in outputs] + [self.params[i] for i in direct]
        grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
        del loss
        terms = []
        for (i, x, _), grad_y in zip(outputs, grads):
            if grad_y is not None:
                change = _linear_of(self.layers[i], x, tangents[i])
                terms.append(torch.sum(grad_y * change, dtype=torch.float32))
        for i, grad_w in zip(direct, grads[len(outputs):]):
            if grad_w is not None:
                terms.append(torch.sum(grad_w * tangents[i], dtype=torch.float32))
        del grads, outputs
        return torch.stack(terms).sum() if terms else None


def _parameter_holders(model: nn.Module) -> dict[int, int]:
    """``id(parameter) -> number of modules that hold it`` (2 or more for tied weights)."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _linear_of(layer: nn.Module, x: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """What the layer's output would change by, per unit step along ``tangent`` (its weight's direction, in
    the weight's stored layout): ``x V^T`` (``nn.Linear``) or ``x V`` (``Conv1D``, stored ``(in, out)``)."""
    return x @ tangent if weight_is_transposed(layer) else torch.nn.functional.linear(x, tangent)


class WrappedOperator(CurvatureOperator):
    """An operator around ``inner``: its size, device and dtype are the inner one's unless overridden."""

    def __init__(self, inner: CurvatureOperator) -> None:
        self.inner = inner

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype


class CountedOperator(WrappedOperator):
    """Wraps an operator: enables autograd, detaches, counts and times its products, advances a progress bar.

    Attributes:
        n_matvecs: products spent; ``seconds``: wall time spent in them.
    """

    def __init__(self, inner: CurvatureOperator, bar: tqdm | None = None) -> None:
        super().__init__(inner)
        self.bar = bar
        self.n_matvecs, self.seconds = 0, 0.0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat ``(size,)`` vector ``v``, detached, ``(size,)``."""
        return self._counted(lambda: self.inner.matvec(v).detach())  # GGN products come with a graph

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``H v`` written into ``out`` (one product, counted and timed like :meth:`matvec`)."""
        return self._counted(lambda: matvec_into(self.inner, v, out))

    def quadratic_form(self, v: torch.Tensor) -> float:
        """``v^T A v`` (one product, counted and timed like :meth:`matvec`)."""
        return self._counted(lambda: quadratic_form(self.inner, v))

    def _counted(self, product: Callable[[], Any]) -> Any:
        """``product()`` with autograd on, counted, timed and shown on the bar."""
        start = time.perf_counter()
        with torch.enable_grad():
            value = product()
        self.seconds += time.perf_counter() - start
        self.n_matvecs += 1
        if self.bar is not None:
            self.bar.update(1)
        return value


def matvec_into(op: CurvatureOperator, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``A v`` written into ``out``: without a separate product vector where the operator can
    (:class:`NLLHessianOperator` and the wrappers here), else copied from ``A v``."""
    into = getattr(op, "matvec_into", None)
    if into is not None:
        return into(v, out)
    return out.copy_(op.matvec(v).detach())


def quadratic_form(op: CurvatureOperator, v: torch.Tensor) -> float:
    """``v^T A v`` of any operator: without a product vector where the operator can
    (:class:`NLLHessianOperator` and the wrappers here), else ``v . (A v)``."""
    form = getattr(op, "quadratic_form", None)
    return form(v) if form is not None else float(torch.dot(v, op.matvec(v).detach().to(v)))


class WorkingPrecisionOperator(WrappedOperator):
    """A bfloat16 / float16 model's operator on float32 vectors.

    Each product runs in the model's dtype (the forward and double backward of a bf16 model; its NLL sums are
    float32, :func:`landscape.objectives.nll_sums_from_logits`), but the vectors it is given and returns, and
    so every Lanczos recurrence, reorthogonalisation, Hutchinson sum and tridiagonal eigensolve, are float32:
    the algorithms' own reductions never round to 8 bits of mantissa. A product itself carries the model's
    rounding (measured on SmolLM2: README, "How far bf16 results may be trusted").
    """

    @property
    def dtype(self) -> torch.dtype:
        return working_dtype(self.inner.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` of a flat float32 ``(size,)`` vector, computed in the model's dtype, as float32."""
        return self.inner.matvec(v.to(self.inner.dtype)).to(self.dtype)

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``H v`` of a float32 vector into the float32 ``out``, computed in the model's dtype."""
        return out.copy_(self.inner.matvec(v.to(self.inner.dtype)))

    def quadratic_form(self, v: torch.Tensor) -> float:
        """``v^T A v`` of a float32 vector, the product computed in the model's dtype."""
        return quadratic_form(self.inner, v.to(self.inner.dtype))


@dataclass(frozen=True, eq=False)
class NLLProblem:
    """The token-mean NLL of ``data`` w.r.t. the weights of ``space``, prepared once for every measurement.

    Attributes:
        model: the model at the weights the curvature is taken at (moved in place by path measurements only).
        data: the held-out segments; ``batches``: their ``(tokens, score_mask)`` batches of ``batch_size``
            segments.
        space: the weights spectra, traces and densities are taken over (directional measurements use the
            direction's own layers instead).
        kind: ``"hessian"`` or ``"ggn"``.
        progress: whether measurements show progress bars.
    """

    model: nn.Module
    data: TokenSet
    batches: list[Batch]
    space: WeightSpace
    kind: OperatorKind
    batch_size: int
    progress: bool

    def operator(self) -> CurvatureOperator:
        """The Hessian (or GGN) of the token-mean NLL over all batches, on flat vectors of :attr:`space`."""
        loss_scale = len(self.batches) / scored_tokens(self.batches)
        inner = nll_operator(self.model, self.batches, loss_scale, self.space, self.kind)
        return WorkingPrecisionOperator(inner) if working_dtype(inner.dtype) != inner.dtype else inner

    def check_model(self, needs_double_backward: bool = True) -> None:
        """Eval mode (and eager attention for products): the model's state may have changed since set-up."""
        check_curvature_model(self.model, needs_double_backward)

    def provenance(self) -> dict[str, Any]:
        """Model name, dtype, batch size and data provenance, for a result's settings (JSON-able)."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"model": model_label(self.model), "dtype": dtype, "batch_size": self.batch_size,
                "data": self.data.provenance()}


# ------------------------------------------------------------------------------------ Krylov memory
def available_memory_bytes(device: torch.device) -> int | None:
    """Memory (bytes) a new allocation on ``device`` can use now: free GPU memory, or Linux's ``MemAvailable``
    (which counts reclaimable page cache); ``None`` where it cannot be known (the check is then skipped)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_krylov_memory(model: nn.Module, space: WeightSpace, n_basis: int, n_returned: int, request: str,
                        knob: str, krylov_dir: str | os.PathLike | None) -> None:
    """Refuse, before any product, a Lanczos run whose vectors cannot fit: ``n_basis`` Krylov vectors (in
    memory, or in files under ``krylov_dir``, which must then have the disk space) and ``n_returned`` Ritz
    vectors (in memory). A 135M-parameter model needs 0.42 GB per fp32 vector: 60 steps are 25 GB.

    Args:
        request, knob: how the error names the request (``"lanczos_steps=60"``) and the setting to lower.
    """
    parameter = next(model.parameters())
    per_vector = space.size * parameter.element_size()  # bytes
    if krylov_dir is not None:
        if parameter.device.type != "cpu":
            raise CurvatureError(f"krylov_dir keeps the Krylov basis in memory-mapped files, which needs the "
                                 f"model on the CPU; it is on {parameter.device}: pass krylov_dir=None")
        directory = Path(krylov_dir)
        if not directory.is_dir():
            raise CurvatureError(f"krylov_dir {str(directory)!r} is not an existing directory")
        free = shutil.disk_usage(directory).free
        if n_basis * per_vector > free:
            raise CurvatureError(
                f"{request} keeps {n_basis} Krylov vectors of {space.size:,} weights "
                f"({n_basis * per_vector / 2**30:.1f} GiB) in krylov_dir {str(directory)!r}, which has "
                f"{free / 2**30:.1f} GiB free: "
                f"{free // per_vector} vectors fit; lower {knob} or choose another directory")
    in_memory = n_returned + (n_basis if krylov_dir is None else 0)
    available = available_memory_bytes(parameter.device)
    need = in_memory * per_vector
    if available is None or need <= KRYLOV_MEMORY_SHARE * available:
        return
    fits = int(KRYLOV_MEMORY_SHARE * available // per_vector)
    raise CurvatureError(
        f"{request} keeps {in_memory} full-length vectors of {space.size:,} weights in memory "
        f"({need / 2**30:.1f} GiB in {parameter.dtype}), more than {KRYLOV_MEMORY_SHARE:.0%} of the "
        f"{available / 2**30:.1f} GiB available on {parameter.device}: "
        f"{fits} vectors fit; lower {knob}, select fewer layers"
        + ("" if krylov_dir is not None or n_basis == 0 else ", keep the basis on disk (krylov_dir)")
        + " or use a larger machine")


def rademacher(n: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None,
               chunk: int = 1 << 20) -> torch.Tensor:
    """A ``(n,)`` vector of random signs, the same as hessian-eigenthings' ``rademacher_like`` draws from
    ``generator`` (``randint(0, 2)`` in order), made a chunk at a time: the library draws all ``n`` as int64
    first (twice a float32 vector) and makes two more float copies on the way."""
    out = torch.empty(n, dtype=dtype, device=device)
    for i in range(0, n, chunk):
        bits = torch.randint(0, 2, (min(chunk, n - i),), dtype=torch.int64, generator=generator)
        out[i : i + len(bits)] = bits.to(device=device, dtype=dtype) * 2.0 - 1.0
    return out


class LeanBackend(SingleDeviceBackend):
    """hessian-eigenthings' vector arithmetic, bit for bit, without vector-sized temporaries: random signs
    drawn a chunk at a time (:func:`rademacher`: no int64 and float copies of a whole vector), ``axpy``
    written into its ``b`` a chunk at a time (the library's Lanczos always passes its own fresh product as
    ``b`` and rebinds it to the result), and Lanczos's initial "previous vector" a broadcast zero (it is
    never read before it is replaced).

    Lanczos's products (through :meth:`products`) are recycled: the loop turns each product into its next
    basis vector (:meth:`scale`) and never reads it again, but still holds it while the next product is made
    (``av = operator.matvec(...)`` rebinds ``av`` only afterwards): that is one vector too many beside the
    product's own memory (0.42 GB on SmolLM2's decoder weights). So in memory the product is scaled in place
    and becomes the basis vector, and with the basis on disk (:class:`MappedBasisBackend`) its buffer, once
    copied to its file, receives the next product. Same kernels, so bit-identical results."""

    chunk = 1 << 20

    def __init__(self) -> None:
        self._product: weakref.ref[torch.Tensor] | None = None  # the last product, while the loop holds it
        self._spare: torch.Tensor | None = None  # a consumed product's buffer, for the next product

    def products(self, op: CurvatureOperator) -> CurvatureOperator:
        """``op`` for this backend's Lanczos loop: its ``matvec`` writes into a recycled buffer where there is
        one and marks the product as the loop's own (:meth:`scale` may then consume it)."""
        return _RecycledProducts(op, self)

    def release_spare(self) -> None:
        """Drop a recycled buffer that no product has taken (call when the loop has ended)."""
        self._spare = None

    def vectors(self, count: int, like: torch.Tensor) -> list[torch.Tensor]:
        """``count`` uninitialised vectors of ``like``'s shape, dtype and device (here the rows of one
        tensor; :class:`MappedBasisBackend`: one mapped file each)."""
        return list(torch.empty((count, *like.shape), dtype=like.dtype, device=like.device))

    def release(self, *vectors: torch.Tensor) -> None:
        """Nothing here (:meth:`MappedBasisBackend.release` drops a mapped vector's pages)."""

    def matvec(self, op: CurvatureOperator, v: torch.Tensor) -> torch.Tensor:
        """``op``'s product with ``v``, written into the recycled buffer where there is one that fits, and
        marked as the loop's own product (:meth:`scale` may consume it)."""
        buffer, self._spare = self._spare, None
        if buffer is None or buffer.shape != v.shape or buffer.dtype != v.dtype or buffer.device != v.device:
            buffer = torch.empty_like(v)
        product = matvec_into(op, v, buffer)
        self._product = weakref.ref(product)
        return product

    def _consume(self, a: torch.Tensor) -> bool:
        """Whether ``a`` is the loop's last product (the library's Lanczos never reads it after ``scale``)."""
        mine = (self._product is not None and self._product() is a and a.is_contiguous()
                and not a.requires_grad)
        if mine:
            self._product = None
        return mine

    def scale(self, alpha: float | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if isinstance(alpha, float) and self._consume(a):
            return a.mul_(alpha)  # the library's alpha * a, in the product's own memory
        return super().scale(alpha, a)

    def rademacher_like(self, a: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return rademacher(a.numel(), a.dtype, a.device, generator).view(a.shape)

    def axpy(self, alpha: float | torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 1 or b.dim() != 1 or not b.is_contiguous() or b.requires_grad:
            return super().axpy(alpha, a, b)
        for i in range(0, b.numel(), self.chunk):  # b + alpha * a: the same two roundings per entry
            b[i : i + self.chunk].add_(alpha * a[i : i + self.chunk])
        return b

    def zeros_like(self, a: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=a.dtype, device=a.device).expand_as(a)


class MappedBasisBackend(LeanBackend):
    """hessian-eigenthings' vector arithmetic, except that ``scale``, which Lanczos uses to make each new
    (unit) basis vector, writes its result into a new memory-mapped file, and that a mapped vector's pages
    leave the process once an operation has read it (``madvise(MADV_DONTNEED)``; the file's pages stay in
    the page cache, which the operating system can write out and reclaim): the basis costs the process one
    vector at a time instead of one per step. Same kernels, so bit-identical results."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.n_files = 0
        self.maps: dict[int, mmap.mmap] = {}  # data_ptr of each mapped vector -> its mapping

    def scale(self, alpha: float | torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        out = self._mapped(a)
        torch.mul(a, alpha, out=out)
        self.release(a, out)
        if self._consume(a):
            self._spare = a  # the product is on disk now: its memory takes the next one
        return out

    def vectors(self, count: int, like: torch.Tensor) -> list[torch.Tensor]:
        return [self._mapped(like) for _ in range(count)]

    def _mapped(self, like: torch.Tensor) -> torch.Tensor:
        """A new vector of ``like``'s shape and dtype in a new mapped file (zeros; no page resident yet)."""
        path = self.directory / f"v{self.n_files:06d}.f{like.element_size()}"
        self.n_files += 1
        size = like.numel() * like.element_size()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # reserve the blocks: a full disk fails here, not mid-write
                mapping = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as err:  # a full disk or a read-only folder
            raise CurvatureError(f"cannot write Krylov vector {self.n_files} ({size:,} B) in --krylov-dir "
                                 f"{self.directory.parent}: {err.strerror}; free space there (it needs one "
                                 f"vector per Lanczos step or Hutch++ sketch row) or choose another "
                                 f"directory") from None
        out = torch.frombuffer(mapping, dtype=like.dtype).view(like.shape)
        self.maps[out.data_ptr()] = mapping
        return out

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` copied into a mapped file (bit for bit); drop ``a`` to hold the vector on disk instead."""
        return self.scale(1.0, a)

    def rademacher_like(self, a: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.keep(super().rademacher_like(a, generator=generator))  # SLQ's start vector, on disk

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = super().dot(a, b)
        self.release(a, b)
        return out

    def norm(self, a: torch.Tensor) -> torch.Tensor:
        out = super().norm(a)
        self.release(a)
        return out

    def axpy(self, alpha: float | torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = super().axpy(alpha, a, b)
        self.release(a)
        return out

    def release(self, *vectors: torch.Tensor) -> None:
        """Drop the pages of those ``vectors`` that are mapped basis vectors from the process (their contents
        stay in the file and come back on the next read)."""
        for v in vectors:
            mapping = self.maps.get(v.data_ptr())
            if mapping is not None and hasattr(mapping, "madvise"):
                mapping.madvise(mmap.MADV_DONTNEED)


class _RecycledProducts(WrappedOperator):
    """``inner``'s products for a :class:`LeanBackend`'s Lanczos loop (:meth:`LeanBackend.products`)."""

    def __init__(self, inner: CurvatureOperator, backend: LeanBackend) -> None:
        super().__init__(inner)
        self.backend = backend

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.backend.matvec(self.inner, v)


@contextlib.contextmanager
def krylov_backend(krylov_dir: str | os.PathLike | None) -> Iterator[LeanBackend]:
    """The vector backend of a Lanczos run: in memory (``None``), or mapped files in a temporary folder under
    ``krylov_dir`` that is removed when the run ends."""
    if krylov_dir is None:
        yield LeanBackend()
        return
    with tempfile.TemporaryDirectory(prefix="krylov-", dir=krylov_dir) as folder:
        yield MappedBasisBackend(Path(folder))
