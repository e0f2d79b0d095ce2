"""The LARS step and the EMA update issue a fixed number of kernels, whatever the number of parameter tensors.

What is counted (`kernel_count`): the aten ops that a step calls itself, i.e. those with no aten op above them in
the profiler's tree, less the ones that only make views or read metadata; each would launch at least one kernel on
CUDA. A `torch._foreach_*` op counts once when CUDA's fused multi-tensor path takes its lists: corresponding tensors
of the same shape, strides (on dimensions of size > 1) and dtype (torch's `ForeachUtils.h`). Otherwise the op falls
back to one kernel per tensor, and counts as many kernels as its lists hold tensors. On the CPU every `_foreach_*` op
runs tensor by tensor, so its own count of child ops says nothing; the shapes and strides the profiler records for
the lists do. A proxy, not the launch count: a fused op launches once per batch of tensors and 64k-element chunks
(hundreds of tensors per launch on recent GPUs) and `stack` once per 128 inputs, one launch each for these models.
"""
import copy

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from byolfast.model.ema import EmaPairs, ema_update_, ema_update_loop_
from byolfast.train.optim import SpreadValues, build_optimizer, lars_step_per_tensor_

METADATA_OPS = frozenset({
    "aten::alias", "aten::as_strided", "aten::chunk", "aten::detach", "aten::empty", "aten::expand", "aten::narrow",
    "aten::reshape", "aten::select", "aten::slice", "aten::split", "aten::t", "aten::unbind", "aten::unsqueeze",
    "aten::view",
})


def _called_by_the_step(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return event.name.startswith("aten::")


def _foreach_kernels(event) -> int:
    """1 if CUDA would fuse this `_foreach_*` op, else its number of tensors (the per-tensor fallback)."""
    lists = [(shapes, strides) for shapes, strides, kind in zip(
        event.structured_input_shapes, event.structured_input_strides, event.input_dtypes) if kind == "TensorList"]
    assert lists and lists[0][0], f"the profiler recorded no tensor lists for {event.name}"
    n = len(lists[0][0])
    dtypes = {tuple(k for k in child.input_dtypes if k not in ("Scalar", "ScalarList", ""))
              for child in event.cpu_children}

    def layout(shapes, strides):
        return [(tuple(shape), tuple(st for st, size in zip(stride, shape) if size != 1))
                for shape, stride in zip(shapes, strides)]

    same_layout = all(layout(*lst) == layout(*lists[0]) for lst in lists)
    same_dtype = len({d for kinds in dtypes for d in kinds}) <= 1
    return 1 if same_layout and same_dtype else n


def kernel_count(fn) -> tuple[int, int]:
    """(ops called by `fn`, kernels they would launch on CUDA), as described in the module docstring."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    ops = [e for e in prof.events() if _called_by_the_step(e) and e.name not in METADATA_OPS
           and not (e.name == "aten::to" and not e.cpu_children)]   # `to` its own dtype: no copy
    kernels = sum(_foreach_kernels(e) if e.name.startswith("aten::_foreach_") else 1 for e in ops)
    return len(ops), kernels


def convnet(blocks: int) -> nn.Sequential:
    """`blocks` x (conv with bias, BatchNorm): 4 parameter tensors per block, one of them 4-D, in channels_last
    (1x1 kernels alternate with 3x3: their strides differ from the gradients' on dimensions of size 1)."""
    layers = []
    for k in range(blocks):
        size = 1 if k % 2 else 3
        layers += [nn.Conv2d(4, 4, size, padding=size // 2), nn.BatchNorm2d(4)]
    return nn.Sequential(*layers).to(memory_format=torch.channels_last)


def _backward(model: nn.Module) -> None:
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    model(x).square().mean().backward()


def _lars(blocks: int):
    torch.manual_seed(blocks)
    model = convnet(blocks)
    opt = build_optimizer(model, "lars", momentum=0.9, weight_decay=1e-4, eta=1e-3)
    for group in opt.param_groups:
        group["lr"] = 0.1
    _backward(model)
    return model, opt


def test_counter_sees_the_per_tensor_fallback():
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    ratios = torch.rand(3)
    assert kernel_count(lambda: torch._foreach_mul(tensors, list(ratios.unbind())))[1] == 3
    assert kernel_count(lambda: torch._foreach_mul(tensors, [t.clone() for t in tensors]))[1] == 1 + 3   # + clones
    assert kernel_count(lambda: torch._foreach_mul(tensors, ratios[0]))[1] == 1
    assert kernel_count(lambda: torch._foreach_add([t.double() for t in tensors[:2]] + tensors[2:], 1.0))[1] == 2 + 3


def test_lars_step_kernels_do_not_grow_with_the_tensor_count():
    counts = {}
    for blocks in (1, 10):
        model, opt = _lars(blocks)
        assert sum(1 for p in model.parameters()) == 4 * blocks
        opt.step()   # creates the momentum buffers and the ratio views
        counts[blocks] = kernel_count(opt.step)
    assert counts[1] == counts[10], f"ops, kernels per step for 4 vs 40 tensors: {counts[1]} vs {counts[10]}"
    assert counts[10][1] <= 30, counts


def test_the_per_tensor_reference_grows_with_the_tensor_count():
    """The counter catches the way the trust ratios were applied before: one kernel per adapted tensor."""
    kernels = {}
    for blocks in (1, 10):
        _, opt = _lars(blocks)
        lars_step_per_tensor_(opt)
        kernels[blocks] = kernel_count(lambda: lars_step_per_tensor_(opt))[1]
    assert kernels[10] - kernels[1] == 9   # one more 4-D tensor per block


def test_ema_update_kernels_do_not_grow_with_the_tensor_count():
    counts, loop = {}, {}
    for blocks in (1, 10):
        online = convnet(blocks)
        pairs = EmaPairs(online, copy.deepcopy(online))
        assert len(pairs.online_params) == 4 * blocks and len(pairs.online_buffers) == 3 * blocks
        counts[blocks] = kernel_count(lambda: ema_update_(pairs, 0.99))
        loop[blocks] = kernel_count(lambda: ema_update_loop_(pairs, 0.99))[1]
    assert counts[1] == counts[10] == (3, 3), counts   # lerp of the parameters, copy of float and int64 buffers
    assert loop[10] > loop[1]



def test_ema_update_is_fused_per_dtype():
    """Tensors of another dtype get their own `_foreach_lerp_` (one list of mixed dtypes: one kernel per tensor)."""
    online = convnet(2)
    online[0].double()
    pairs = EmaPairs(online, copy.deepcopy(online))
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert kernel_count(lambda: ema_update_(pairs, 0.5)) == (4, 4)   # float64 and float32 lerps, two buffer copies
    torch.testing.assert_close(pairs.target_params[0], online[0].weight - 0.5)

def test_fused_lars_matches_the_per_tensor_reference():
    """Three steps (momentum included) of the fused step and of the reference from the same start agree."""
    model, opt = _lars(4)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, "lars", momentum=0.9, weight_decay=1e-4, eta=1e-3)
    for group in twin_opt.param_groups:
        group["lr"] = 0.1
    for step in range(3):
        torch.manual_seed(100 + step)
        grads = [torch.randn_like(p) * 10 ** -(k % 3) for k, p in enumerate(model.parameters())]
        grads[1].zero_()   # a zero update: ratio 1
        for p, q, g in zip(model.parameters(), twin.parameters(), grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        lars_step_per_tensor_(twin_opt)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"],
                                   rtol=1e-6, atol=1e-7)


def test_lars_state_dict_keeps_its_layout_and_resumes():
    """The state holds one momentum buffer per parameter and nothing else; a reloaded optimizer (its ratio views
    rebuilt for the new parameters) continues exactly as the original."""
    model, opt = _lars(3)
    opt.step()
    state = opt.state_dict()
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    assert len(state["state"]) == 12
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(twin, "lars", momentum=0.9, weight_decay=1e-4, eta=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(state))
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_spread_values_take_each_tensors_shape_and_strides():
    base = torch.randn(6, 8)
    like = [torch.randn(3, 4), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last), torch.randn(4, 3).t(),
            torch.randn(8, 4, 1, 1).to(memory_format=torch.channels_last), base[:, ::2]]   # the last one has gaps
    spread = SpreadValues(like)
    views = spread.fill_(torch.arange(1.0, 6.0))
    for k, (view, t) in enumerate(zip(views, like)):
        assert view.shape == t.shape and torch.all(view == k + 1)
        if k < 4:   # dense: the same strides, which the fused kernels need
            assert view.stride() == t.stride()
    assert spread.values.numel() == sum(t.numel() for t in like)
