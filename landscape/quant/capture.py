"""Calibration inputs of decoder blocks and their linear layers, and the block-by-block driver of
layer-wise quantizers (GPTQ).

How inputs are obtained, without relying on any transformers block signature:

1. :func:`capture_block_inputs` runs the calibration batches through the model once with a forward
   pre-hook on the first decoder block (``with_kwargs=True``) and records exactly what the model passes
   to it (hidden states plus every other argument: masks, position ids, rotary embeddings); a private
   exception stops each forward pass there, so the rest of the model never runs.
2. A block is then replayed as ``block(*call.args, **call.kwargs)`` (:func:`run_block`), with forward
   hooks on its linear layers accumulating each layer's input second moment. A block's outputs are the
   next block's inputs.
3. True-sequential quantization (each input group solved on inputs that reflect the groups solved before
   it) runs each block once (:func:`solve_in_one_pass`): every call's forward runs in a thread of its own
   that pauses at each group's first layer until the group is solved, so nothing is replayed. The threads
   take turns (never two at once), in call order, so the result is bit-identical to replaying the block
   once per group.

Conventions:

* The Hessian of a layer's local objective is ``H = 2/n * sum_x x x^T`` (``(in, in)``, in the compute
  dtype), summed over all ``n`` token positions of the calibration set; ``x`` is the layer's input row.
* The local output MSE of a weight change ``dW`` (``(out, in)``) is ``mean over tokens and outputs of
  (dW x)^2 = tr(dW H dW^T) / (2 * out)`` (units: squared activations), the same quantity as
  :func:`landscape.objectives.layer_mse`.
* Layers are always named by module name and handled as ``(out, in)`` matrices
  (:func:`landscape.models.weight_matrix`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from landscape.data import TokenSet
from landscape.memory import PeriodicRelease, share_malloc_arenas
from landscape.objectives import check_in_vocabulary
from landscape.quant.formats import QuantFormat, parse_format
from landscape.weights import (
    decoder_blocks,
    decoder_blocks_prefix,
    quantizable_layers,
    restored_on_exit,
    select_layers,
    weight_matrix,
)

COMPUTE_DTYPES = (torch.float32, torch.float64)


class _StopForward(Exception):
    """Raised by the capture hook: the first block's inputs are recorded, the rest of the forward is not
    needed."""


# ------------------------------------------------------------------------------------ validation
def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None = None,
                   fmt: QuantFormat | str | None = None) -> list[str]:
    """Names of the layers to quantize, in forward order, after checking every one of them up front.

    Args:
        layers: what :func:`landscape.weights.select_layers` takes: ``None`` (every quantizable layer), layer
            names and/or glob patterns (``"*.mlp.*"``), each of which must match at least one quantizable
            layer.
        fmt: when given, every selected weight's shape is checked against it (group size divides
            ``in_features``) and every weight must be finite.

    Raises:
        LayerSelectionError: an entry matches no quantizable layer (the message lists valid names).
        landscape.quant.formats.FormatError: a layer's shape does not fit ``fmt``.
        ValueError: a weight contains NaN or Inf.
    """
    available = quantizable_layers(model)
    names = select_layers(model, layers)
    fmt = parse_format(fmt) if fmt is not None else None
    for name in names:
        w = weight_matrix(available[name])
        if fmt is not None:
            fmt.check_shape(tuple(w.shape), name)
        if not torch.isfinite(w).all():
            bad = (~torch.isfinite(w)).nonzero()[0].tolist()
            raise ValueError(f"layer {name!r}: weight contains NaN or Inf (first at index {bad}); refusing "
                             f"to quantize")
    return names


def check_calibration(model: nn.Module, calib: TokenSet) -> None:
    """Raise unless ``calib`` is a :class:`TokenSet` (integer ids, checked when it was built) inside the
    model's vocabulary (``ValueError`` naming the range)."""
    if not isinstance(calib, TokenSet):
        raise TypeError(f"calibration data must be a landscape.data.TokenSet, got {type(calib).__name__}")
    check_in_vocabulary(model, calib, "calibration data")


def check_compute_dtype(compute_dtype: torch.dtype, what: str = "compute_dtype") -> None:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be torch.float32 or torch.float64, got {compute_dtype!r}")


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------------- block inputs
@dataclass(frozen=True)
class BlockCall:
    """One batch's call of a decoder block, exactly as the model made it.

    ``args[0]`` (or ``kwargs["hidden_states"]`` when the model passed it by keyword) is the hidden
    state ``(batch, seq, hidden)``; everything else (masks, position ids, rotary embeddings) is
    replayed unchanged for every block.
    """

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> "BlockCall":
        if self.args:
            return BlockCall((hidden, *self.args[1:]), self.kwargs)
        return BlockCall((), {**self.kwargs, "hidden_states": hidden})


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: TokenSet, batch_size: int = 8) -> list[BlockCall]:
    """What the model passes to its first decoder block, one :class:`BlockCall` per calibration batch.

    One forward pass per batch (``use_cache=False``), cut short after the embeddings by a private
    exception raised from a forward pre-hook on block 0. Raises ``ValueError`` if the hidden states
    are not finite (e.g. NaN in the embeddings), before anything is quantized.
    """
    check_calibration(model, calib)
    check_batch_size(batch_size)
    device = next(model.parameters()).device
    calls: list[BlockCall] = []

    def record(module, args, kwargs):
        if not args and "hidden_states" not in kwargs:
            raise ValueError(f"{type(module).__name__} was called without positional hidden states or a "
                             f"'hidden_states' keyword (got {sorted(kwargs)}); cannot capture its inputs")
        calls.append(BlockCall(tuple(args), dict(kwargs)))
        raise _StopForward

    handle = decoder_blocks(model)[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for tokens, _ in calib.batches(batch_size):
            try:
                model(input_ids=tokens.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    for i, call in enumerate(calls):
        if not torch.isfinite(call.hidden).all():
            raise ValueError(f"hidden states entering the first decoder block contain NaN or Inf "
                             f"(calibration batch {i}): check the model's embeddings; refusing to quantize")
    return calls


def _block_output(out: Any) -> torch.Tensor:
    """A block returns its hidden states as a tensor (transformers 5) or as the first item of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def add_second_moment(total: torch.Tensor | None, inputs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``total + x^T x`` over the rows ``x`` of a layer's input (``(..., in)``, in ``dtype``), accumulated in
    place; ``total=None`` starts the sum."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(dtype)  # (tokens, in)
    return x.T @ x if total is None else total.addmm_(x.T, x)


@torch.no_grad()
def run_block(
    block: nn.Module,
    calls: Sequence[BlockCall],
    watched: Mapping[str, nn.Module] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    keep_outputs: bool = True,
) -> tuple[list[BlockCall], dict[str, torch.Tensor]]:
    """Replay ``block`` on every call; optionally accumulate the Hessians of some of its linear layers.

    Args:
        watched: layer name -> module inside ``block`` whose input Hessian ``H = 2/n sum x x^T`` is wanted.
        compute_dtype: dtype of the accumulated Hessians.
        keep_outputs: return the block outputs as the next block's calls (else an empty list). When
            ``False`` and layers are watched, each replay stops as soon as every watched layer has seen its
            input (the rest of the block cannot change them): the capture pass for ``q/k/v`` costs a
            layer norm, not a block.

    Layers that read the same input tensor (``q/k/v``, ``gate/up``) get one Hessian, computed once and shared
    (the same tensor object: treat it as read-only).

    Returns:
        ``(next_calls, hessians)``: ``hessians[name]`` is ``(in, in)`` on the module's device.

    Raises:
        ValueError: a watched layer received no input during the pass.
    """
    watched = dict(watched or {})
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(watched, 0)
    stop_early = bool(watched) and not keep_outputs
    seen_this_call: dict[str, torch.Tensor] = {}  # watched layer -> the input tensor it read in this call
    shares: dict[str, str] = {}  # a layer reading an earlier one's input tensor (k, v after q) -> that one

    def hook_for(name: str):
        def accumulate(module, args):
            if name not in sums and name not in shares:  # first call: does it read an earlier layer's input?
                owner = next((n for n, t in seen_this_call.items() if t is args[0] and n not in shares), None)
                if owner is not None:
                    shares[name] = owner
            if name not in shares:  # one x^T x per distinct input: q/k/v and gate/up share theirs
                sums[name] = add_second_moment(sums.get(name), args[0], compute_dtype)
            counts[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
            seen_this_call[name] = args[0]
            if stop_early and len(seen_this_call) == len(watched):
                raise _StopForward

        return accumulate

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in watched.items()]
    outputs: list[BlockCall] = []
    try:
        for call in calls:
            seen_this_call.clear()
            try:
                out = _block_output(block(*call.args, **call.kwargs))
            except _StopForward:
                continue
            if keep_outputs:
                outputs.append(call.with_hidden(out))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in counts.items() if c == 0]
    if missing:
        raise ValueError(f"layers {missing} received no input when their decoder block ran; cannot build "
                         f"their Hessian")
    hessians = {n: sums[n] * (2.0 / counts[n]) for n in watched if n not in shares}
    return outputs, {n: hessians[shares.get(n, n)] for n in watched}  # shared: one tensor, read-only


@torch.no_grad()
def input_groups(block: nn.Module, layers: Mapping[str, nn.Module], call: BlockCall) -> list[list[str]]:
    """Layers of ``block`` that read the same input tensor (e.g. q/k/v), as groups in forward order.

    Detected by tensor identity during one replay of ``call``: layers whose pre-hooks see the same
    tensor object form a group. Order inside a group and between groups is the order of first call.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []  # keeps the tensors alive, so identity is meaningful

    def hook_for(name: str):
        def record(module, args):
            if any(name in group for _, group in seen):
                return
            for tensor, group in seen:
                if tensor is args[0]:
                    group.append(name)
                    return
            seen.append((args[0], [name]))

        return record

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        block(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    grouped = [g for _, g in seen]
    missing = [n for n in layers if not any(n in g for g in grouped)]
    if missing:
        raise ValueError(f"layers {missing} received no input when their decoder block ran")
    return grouped


def output_mse(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``mean over tokens and outputs of (delta x)^2 = tr(delta H delta^T) / (2 * out)``, with
    ``H = 2/n sum x x^T``.

    ``delta`` is a ``(out, in)`` weight change; the result is in squared activation units.
    """
    d = delta.to(hessian.dtype)
    return float(((d @ hessian) * d).sum() / (2 * d.shape[0]))


# ------------------------------------------------------------------------- one pass, paused per group
_worker = threading.local()  # .turn: the _Turn whose block forward this thread runs


class _Turn:
    """One call's block forward, run in a thread of its own but only while the driver waits on it.

    The driver hands the turn over with :meth:`resume` and gets it back when the forward pauses at a group's
    first layer (:meth:`pause`, from a pre-hook) or finishes; so exactly one thread computes at any time and
    every tensor operation happens in the same order as in a plain loop over the calls.
    """

    def __init__(self, block: nn.Module, call: BlockCall):
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.paused_at = -1  # the last group whose first layer this forward reached
        self.output: torch.Tensor | None = None
        self.finished = False
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, args=(block, call), daemon=True,
                                        name="landscape-block-call")
        self._thread.start()

    def _run(self, block: nn.Module, call: BlockCall) -> None:
        _worker.turn = self
        self._go.acquire()
        try:
            if not self._abort:
                with torch.no_grad():  # grad mode is per thread
                    self.output = _block_output(block(*call.args, **call.kwargs))
        except _StopForward:
            pass
        except BaseException as error:  # handed to the driver by resume()
            self._error = error
        finally:
            self.finished = True
            self._back.release()

    def pause(self, group: int) -> None:
        """In this turn's thread: give the turn back to the driver at ``group`` and wait to be resumed."""
        self.paused_at = group
        self._back.release()
        self._go.acquire()
        if self._abort:
            raise _StopForward

    def resume(self) -> None:
        """In the driver: run this forward until its next pause or its end; re-raise what it raised."""
        self._go.release()
        self._back.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        """End the thread without finishing the forward (its activations are freed)."""
        if not self.finished:
            self._abort = True
            self._go.release()
        self._thread.join()


@torch.no_grad()
def solve_in_one_pass(
    block: nn.Module,
    calls: Sequence[BlockCall],
    layers: Mapping[str, nn.Module],
    groups: Sequence[Sequence[str]],
    solve_group: Callable[[list[str], torch.Tensor], None],
    compute_dtype: torch.dtype = torch.float64,
    keep_outputs: bool = True,
) -> list[BlockCall]:
    """Run ``block`` once over ``calls``, solving each input group as soon as every call has reached it.

    Every call's forward pauses in a pre-hook on the first layer of each group (``groups`` in forward order,
    from :func:`input_groups`); once all calls are paused there, the group's Hessian ``H = 2/n sum x x^T``
    (in ``compute_dtype``, summed in call order) is handed to ``solve_group(group, H)``, which installs the
    group's quantized weights, and the forwards go on, so later groups see earlier ones quantized. The
    result is bit-identical to replaying the block once per group (:func:`run_block` with
    ``keep_outputs=False``) and once more for its outputs, at the cost of one block forward instead of about
    three; the price is that every call's activations at the pause point are alive at once (on a Llama,
    the MLP's intermediate activations of the whole calibration set while ``down_proj`` is solved). The calls'
    threads share the C allocator's arenas (:func:`landscape.memory.share_malloc_arenas`).

    A group's first layer is expected to be called once per forward: a second call passes through.

    Returns:
        The block's outputs as the next block's calls (computed with every group quantized), or ``[]``
        when ``keep_outputs`` is False (the forwards are then stopped after the last group).

    Raises:
        ValueError: a call's forward never reached a group's first layer (the group would have no Hessian).
    """
    sums: list[torch.Tensor | None] = [None] * len(groups)
    counts = [0] * len(groups)

    def hook_for(index: int):
        def reached(module, args):
            turn = getattr(_worker, "turn", None)
            if turn is None or index <= turn.paused_at:  # another caller, or a second call of the layer
                return
            sums[index] = add_second_moment(sums[index], args[0], compute_dtype)
            counts[index] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
            turn.pause(index)

        return reached

    handles = [layers[group[0]].register_forward_pre_hook(hook_for(i)) for i, group in enumerate(groups)]
    share_malloc_arenas()  # a thread per call: without this, each one's freed memory stays in its own arena
    turns = [_Turn(block, call) for call in calls]
    try:
        for index, group in enumerate(groups):
            for turn in turns:
                turn.resume()
                if turn.finished or turn.paused_at != index:
                    raise ValueError(f"layers {list(group)} received no input when their decoder block ran "
                                     f"(a call's forward {'ended' if turn.finished else 'went on'} without "
                                     f"reaching {group[0]}); cannot build their Hessian")
            hessian = sums[index].mul_(2.0 / counts[index])
            sums[index] = None
            solve_group(list(group), hessian)
            del hessian
        if not keep_outputs:
            return []
        outputs = []
        for call, turn in zip(calls, turns, strict=True):
            turn.resume()  # to the end of the block
            outputs.append(call.with_hidden(turn.output))
            turn.output = None
        return outputs
    finally:
        for turn in turns:
            turn.stop()
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------- the driver
LayerSolver = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]
"""``solve(name, w0, hessian) -> (w_q, info)``: quantize one layer's ``(out, in)`` weight given its
Hessian."""

GroupSolver = Callable[[list[str], list[torch.Tensor], torch.Tensor], list[tuple[torch.Tensor, Any]]]
"""``solve(names, w0s, hessian) -> [(w_q, info), ...]``: quantize the layers of one input group (layers that
read the same input tensor, such as q/k/v or gate/up, and so share one Hessian), one result per layer in the
order given. A solver whose rows are independent given ``H`` (GPTQ) solves the group as one problem."""


def per_layer(solve: LayerSolver) -> GroupSolver:
    """A :data:`GroupSolver` that solves each layer of a group on its own with ``solve``."""
    def solve_group(names: list[str], w0s: list[torch.Tensor], hessian: torch.Tensor):
        return [solve(name, w0, hessian) for name, w0 in zip(names, w0s)]

    return solve_group


@dataclass(frozen=True)
class SolvedLayer:
    """One layer as the driver saw it solved.

    Attributes:
        weight: quantized ``(out, in)`` weight in the model's dtype, on the model's device.
        info: whatever the solver reported (e.g. :class:`landscape.quant.gptq.GPTQLayerInfo`).
        output_mse: local output MSE of ``weight - w0`` on the inputs the layer was solved on
            (squared activations; see the module docstring).
        seconds: wall time of the solver call alone.
    """

    weight: torch.Tensor
    info: Any
    output_mse: float
    seconds: float


def quantize_block_by_block(
    model: nn.Module,
    calib: TokenSet,
    names: Sequence[str],
    solve: GroupSolver,
    *,
    sequential: bool = True,
    true_sequential: bool = True,
    one_pass: bool = True,
    batch_size: int = 8,
    compute_dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> dict[str, SolvedLayer]:
    """Quantize the named layers block by block with a layer-wise solver; the model is left as it was.

    Why so many parameters: ten, not a settings object, because the driver serves any layer-wise solver
    (GPTQ passes the input order, pass strategy and Hessian dtype of its
    :class:`~landscape.quant.gptq.GPTQSettings`), and its six keyword-only knobs (input order, passes, memory,
    dtype, progress) are the driver's own.

    Args:
        names: layers to quantize (already validated, e.g. by :func:`resolve_layers`).
        solve: the solver, called once per input group (layers reading the same tensor, see
            :func:`input_groups`) in forward order with the group's one Hessian; wrap a one-layer solver
            with :func:`per_layer`.
        sequential: each block's inputs come from the model whose earlier blocks are already
            quantized (GPTQ's default). ``False``: every layer sees the full-precision model's inputs.
        true_sequential: with ``sequential``, a block's input groups are solved in order and each group's
            inputs reflect the earlier groups quantized (one pass per block, :func:`solve_in_one_pass`).
            Ignored when ``sequential=False``.
        one_pass: with ``true_sequential``, run each block once with every call's forward paused at each
            group (:func:`solve_in_one_pass`: about a third of the block forwards, and every call's
            activations alive at a pause); ``False`` replays the block once per group (the activations of
            one call at a time; on SmolLM2 at 128 x 256 tokens 1.65x slower). The results are identical.
        compute_dtype: dtype of the Hessians handed to ``solve``.

    Returns:
        layer name -> :class:`SolvedLayer`, in forward order (a group's solver seconds are shared among its
        layers in proportion to their rows). The model's weights are restored to w0 bit-exactly before
        returning (and on any exception).
    """
    check_compute_dtype(compute_dtype)
    modules = quantizable_layers(model)
    unknown = [n for n in names if n not in modules]
    if not names or unknown:
        raise KeyError(f"names must be a non-empty list of quantizable layers; not quantizable: "
                       f"{unknown[:4]}")
    blocks = decoder_blocks(model)
    prefix = decoder_blocks_prefix(model)
    per_block: list[dict[str, nn.Module]] = [{} for _ in blocks]
    for name in names:
        per_block[int(name[len(prefix) + 1:].split(".")[0])][name] = modules[name]
    last_block = max(i for i, layers in enumerate(per_block) if layers)
    calls = capture_block_inputs(model, calib, batch_size)

    solved: dict[str, SolvedLayer] = {}
    bar = _progress(len(names), progress)
    # After each group (at most once a second: every group of SmolLM2, rarely a toy's), the heap's freed
    # blocks go back to the system: in a process whose heap has free space left by earlier work, the
    # calibration forwards' activations come from it, not from mappings of their own, and stay resident once
    # freed.
    release_heap = PeriodicRelease()

    def solve_and_install(group: list[str], w0: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]):
        hessian = hessians[group[0]]
        if any(hessians[n] is not hessian for n in group):  # input_groups and run_block disagree
            raise RuntimeError(f"layers {group} were grouped as reading one input but got different Hessians")
        t0 = time.perf_counter()
        results = solve(group, [w0[n] for n in group], hessian)
        seconds = time.perf_counter() - t0
        rows = sum(w0[n].shape[0] for n in group)
        for name, (w_q, info) in zip(group, results, strict=True):
            target = weight_matrix(modules[name]).detach()
            target.copy_(w_q)  # later layers (sequential) see this layer quantized
            installed = target.clone(memory_format=torch.contiguous_format)
            solved[name] = SolvedLayer(installed, info, output_mse(installed - w0[name], hessian),
                                       seconds * w0[name].shape[0] / rows)
            hessians.pop(name)
        bar.update(len(group))
        release_heap()

    try:
        for index in range(last_block + 1):
            block, layers = blocks[index], per_block[index]
            bar.set_postfix_str(f"block {index}")
            # One block's w0 aside at a time: once its outputs (the next block's inputs) are computed, the
            # block goes back to w0, bit-exactly, also on an exception.
            with restored_on_exit(model, list(layers)) as w0:
                groups = input_groups(block, layers, calls[0]) if layers else []
                if layers and sequential and true_sequential and one_pass:
                    calls = solve_in_one_pass(
                        block, calls, layers, groups,
                        lambda group, hessian: solve_and_install(group, w0, dict.fromkeys(group, hessian)),
                        compute_dtype, keep_outputs=index < last_block)
                elif layers and sequential and true_sequential:  # one replay per group, then the outputs
                    for group in groups:
                        _, hessians = run_block(block, calls, {n: layers[n] for n in group}, compute_dtype,
                                                keep_outputs=False)
                        solve_and_install(group, w0, hessians)
                    if index < last_block:
                        calls, _ = run_block(block, calls)
                elif layers and sequential:  # every group on the inputs of the block's w0, then the outputs
                    _, hessians = run_block(block, calls, layers, compute_dtype, keep_outputs=False)
                    for group in groups:
                        solve_and_install(group, w0, hessians)
                    if index < last_block:
                        calls, _ = run_block(block, calls)
                else:  # inputs and outputs of the full-precision block, in one pass
                    calls, hessians = run_block(block, calls, layers, compute_dtype,
                                                keep_outputs=index < last_block)
                    for group in groups:
                        solve_and_install(group, w0, hessians)
    finally:
        bar.close()
    return {n: solved[n] for n in names}


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="quantize layers", unit="layer", disable=not enabled, leave=False)
