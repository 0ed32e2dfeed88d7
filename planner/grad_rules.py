"""The VJP table: one small function per ONNX op type, emitting standard ONNX ops.

A rule gets the emitter, the forward node, the gradient of each output (None where no
gradient flows) and which inputs need a gradient; it returns one gradient per input (None
where not needed). A returned gradient may have the *broadcast* shape of the node's output:
``planner.autodiff`` reduces it to the input's shape, so rules never undo broadcasting.

Rules read attributes and constant operands (axes, pads, starts) at build time: the importer
folded them, so shapes and indices are static. Ops in ``NON_DIFFERENTIABLE`` stop gradients
(integer, boolean and shape results, or piecewise-constant math).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from planner.autodiff import Emitter, GradRule
from planner.errors import UserError
from planner.graph import const_array, numel, shape_of

Grads = list[ir.Value | None]
NON_DIFFERENTIABLE = frozenset(
    "And ArgMax ArgMin BitShift Ceil Constant ConstantOfShape Equal EyeLike Floor Greater "
    "GreaterOrEqual IsInf IsNaN Less LessOrEqual NonZero Not OneHot Or Range Round Shape Sign "
    "Size Xor".split()
)
GRAD_RULES: dict[str, GradRule] = {}


def rule(*ops: str) -> Callable[[GradRule], GradRule]:
    def register(fn: GradRule) -> GradRule:
        for op in ops:
            GRAD_RULES[op] = fn
        return fn

    return register


def _x(node: ir.Node, i: int = 0) -> ir.Value:
    value = node.inputs[i]
    assert value is not None
    return value


def _y(node: ir.Node) -> ir.Value:
    return node.outputs[0]


def _ints(node: ir.Node, name: str, index: int | None = None) -> list[int] | None:
    """An int-list operand: the attribute ``name`` or, from newer opsets, constant input."""
    if name in node.attributes:
        return list(node.attributes.get_ints(name) or [])
    if index is not None and index < len(node.inputs) and node.inputs[index] is not None:
        array = const_array(node.inputs[index])
        if array is None:
            raise UserError(
                f"{node.op_type} '{node.name}': input {index} ('{name}') must be a "
                "constant to differentiate it"
            )
        return [int(a) for a in np.asarray(array).reshape(-1)]
    return None


def _unsupported(node: ir.Node, what: str) -> UserError:
    return UserError(f"no gradient rule for {node.op_type} with {what} (node '{node.name}')")


# -- elementwise unary: d/dx written with the output y where that is cheaper ----------------

Unary = Callable[[Emitter, ir.Node, ir.Value, ir.Value], ir.Value]


def _unary(*ops: str) -> Callable[[Unary], Unary]:
    def register(fn: Unary) -> Unary:
        def vjp(e: Emitter, node: ir.Node, grads: Grads, needs: list[bool]) -> Grads:
            g = grads[0]
            assert g is not None
            return [fn(e, node, g, _x(node)), *[None] * (len(node.inputs) - 1)]

        rule(*ops)(vjp)
        return fn

    return register


@_unary("Identity", "Dropout")
def _identity(e, node, g, x):
    return g


@_unary("Neg")
def _neg(e, node, g, x):
    return e.op("Neg", g)


@_unary("Relu")
def _relu(e, node, g, x):
    zero = e.scalar(0.0, x)
    return e.op("Where", e.op("Greater", x, zero), g, zero)


@_unary("LeakyRelu")
def _leaky_relu(e, node, g, x):
    alpha = e.scalar(node.attributes.get_float("alpha", 0.01), x)
    return e.op("Where", e.op("Greater", x, e.scalar(0.0, x)), g, e.op("Mul", g, alpha))


@_unary("ThresholdedRelu")
def _thresholded_relu(e, node, g, x):
    alpha = e.scalar(node.attributes.get_float("alpha", 1.0), x)
    return e.op("Where", e.op("Greater", x, alpha), g, e.scalar(0.0, x))


@_unary("Elu", "Selu", "Celu")
def _elu_family(e, node, g, x):
    """For x <= 0 each is c·(exp(x/a) - 1), whose slope y/a + c/a... is affine in y."""
    y = _y(node)
    if node.op_type == "Celu":
        alpha = node.attributes.get_float("alpha", 1.0)
        neg = e.op("Add", e.op("Div", y, e.scalar(alpha, x)), e.scalar(1.0, x))
        pos = g
    else:
        alpha = node.attributes.get_float("alpha", 1.0 if node.op_type == "Elu" else 1.67326319)
        gamma = node.attributes.get_float("gamma", 1.05070102) if node.op_type == "Selu" else 1.0
        neg = e.op("Add", y, e.scalar(alpha * gamma, x))
        pos = e.op("Mul", g, e.scalar(gamma, x))
    return e.op("Where", e.op("Greater", x, e.scalar(0.0, x)), pos, e.op("Mul", g, neg))


@_unary("Tanh")
def _tanh(e, node, g, x):
    y = _y(node)
    return e.op("Mul", g, e.op("Sub", e.scalar(1.0, x), e.op("Mul", y, y)))


@_unary("Sigmoid")
def _sigmoid(e, node, g, x):
    y = _y(node)
    return e.op("Mul", g, e.op("Mul", y, e.op("Sub", e.scalar(1.0, x), y)))


@_unary("Erf")
def _erf(e, node, g, x):
    gauss = e.op("Exp", e.op("Neg", e.op("Mul", x, x)))
    return e.op("Mul", g, e.op("Mul", gauss, e.scalar(2.0 / math.sqrt(math.pi), x)))


@_unary("Gelu")
def _gelu(e, node, g, x):
    """approximate='none': Φ(x) + x·φ(x); approximate='tanh': the derivative of tanh form."""

    def c(v: float) -> ir.Value:
        return e.scalar(v, x)

    if node.attributes.get_string("approximate", "none") == "tanh":
        k, a = math.sqrt(2.0 / math.pi), 0.044715
        x2 = e.op("Mul", x, x)
        inner = e.op("Add", c(1.0), e.op("Mul", x2, c(a)))
        t = e.op("Tanh", e.op("Mul", e.op("Mul", x, c(k)), inner))
        dt = e.op(
            "Mul",
            e.op("Sub", c(1.0), e.op("Mul", t, t)),
            e.op("Mul", c(k), e.op("Add", c(1.0), e.op("Mul", x2, c(3 * a)))),
        )
        slope = e.op("Mul", c(0.5), e.op("Add", e.op("Add", c(1.0), t), e.op("Mul", x, dt)))
    else:
        cdf = e.op("Mul", c(0.5), e.op("Add", c(1.0), e.op("Erf", e.op("Mul", x, c(0.5**0.5)))))
        pdf = e.op(
            "Mul",
            e.op("Exp", e.op("Mul", e.op("Mul", x, x), c(-0.5))),
            c(1.0 / math.sqrt(2 * math.pi)),
        )
        slope = e.op("Add", cdf, e.op("Mul", x, pdf))
    return e.op("Mul", g, slope)


@_unary("Exp")
def _exp(e, node, g, x):
    return e.op("Mul", g, _y(node))


@_unary("Log")
def _log(e, node, g, x):
    return e.op("Div", g, x)


@_unary("Sqrt")
def _sqrt(e, node, g, x):
    return e.op("Div", g, e.op("Mul", _y(node), e.scalar(2.0, x)))


@_unary("Reciprocal")
def _reciprocal(e, node, g, x):
    y = _y(node)
    return e.op("Neg", e.op("Mul", g, e.op("Mul", y, y)))


@_unary("Abs")
def _abs(e, node, g, x):
    return e.op("Mul", g, e.op("Sign", x))


@_unary("Sin")
def _sin(e, node, g, x):
    return e.op("Mul", g, e.op("Cos", x))


@_unary("Cos")
def _cos(e, node, g, x):
    return e.op("Neg", e.op("Mul", g, e.op("Sin", x)))


@_unary("Tan")
def _tan(e, node, g, x):
    y = _y(node)
    return e.op("Mul", g, e.op("Add", e.scalar(1.0, x), e.op("Mul", y, y)))


@_unary("Sinh", "Cosh")
def _sinh_cosh(e, node, g, x):
    other = e.op("Cosh" if node.op_type == "Sinh" else "Sinh", x, shape=shape_of(x))
    return e.op("Mul", g, other)


@_unary("Softplus")
def _softplus(e, node, g, x):
    return e.op("Mul", g, e.op("Sigmoid", x))


@_unary("Softsign")
def _softsign(e, node, g, x):
    d = e.op("Add", e.scalar(1.0, x), e.op("Abs", x))
    return e.op("Div", g, e.op("Mul", d, d))


@_unary("HardSigmoid")
def _hard_sigmoid(e, node, g, x):
    alpha = node.attributes.get_float("alpha", 0.2)
    z = e.op(
        "Add",
        e.op("Mul", x, e.scalar(alpha, x)),
        e.scalar(node.attributes.get_float("beta", 0.5), x),
    )
    inside = e.op("And", e.op("Greater", z, e.scalar(0.0, x)), e.op("Less", z, e.scalar(1.0, x)))
    return e.op("Where", inside, e.op("Mul", g, e.scalar(alpha, x)), e.scalar(0.0, x))


@_unary("HardSwish")
def _hard_swish(e, node, g, x):
    mid = e.op("Add", e.op("Div", x, e.scalar(3.0, x)), e.scalar(0.5, x))
    high = e.op("Where", e.op("Greater", x, e.scalar(3.0, x)), e.scalar(1.0, x), mid)
    slope = e.op("Where", e.op("Less", x, e.scalar(-3.0, x)), e.scalar(0.0, x), high)
    return e.op("Mul", g, slope)


@_unary("Mish")
def _mish(e, node, g, x):
    t = e.op("Tanh", e.op("Softplus", x))
    sech2 = e.op("Sub", e.scalar(1.0, x), e.op("Mul", t, t))
    return e.op("Mul", g, e.op("Add", t, e.op("Mul", e.op("Mul", x, e.op("Sigmoid", x)), sech2)))


@_unary("Cast")
def _cast(e, node, g, x):
    assert x.dtype is not None
    return e.cast(g, x.dtype)


@rule("CastLike")
def _cast_like(e, node, grads, needs):
    return [_cast(e, node, grads[0], _x(node)), None]


@rule("Clip")
def _clip(e, node, grads, needs):
    x, g = _x(node), grads[0]
    keep = None
    for i, op in ((1, "GreaterOrEqual"), (2, "LessOrEqual")):
        if i < len(node.inputs) and node.inputs[i] is not None:
            inside = e.op(op, x, node.inputs[i])
            keep = inside if keep is None else e.op("And", keep, inside)
    gx = g if keep is None else e.op("Where", keep, g, e.scalar(0.0, x))
    return [gx, None, None]


# -- elementwise binary / variadic (broadcasting undone by the walker) --------------------------


@rule("Add", "Sum")
def _add(e, node, grads, needs):
    return [grads[0]] * len(node.inputs)


@rule("Sub")
def _sub(e, node, grads, needs):
    g = grads[0]
    return [g, e.op("Neg", g) if needs[1] else None]


@rule("Mean")
def _mean(e, node, grads, needs):
    g = grads[0]
    return [e.op("Div", g, e.scalar(len(node.inputs), g))] * len(node.inputs)


@rule("Mul")
def _mul(e, node, grads, needs):
    g, a, b = grads[0], _x(node, 0), _x(node, 1)
    return [e.op("Mul", g, b) if needs[0] else None, e.op("Mul", g, a) if needs[1] else None]


@rule("Div")
def _div(e, node, grads, needs):
    g_over_b = e.op("Div", grads[0], _x(node, 1))
    return [g_over_b, e.op("Neg", e.op("Mul", g_over_b, _y(node))) if needs[1] else None]


@rule("Pow")
def _pow(e, node, grads, needs):
    g, a, b, y = grads[0], _x(node, 0), _x(node, 1), _y(node)
    ga = gb = None
    if needs[0]:
        bf = e.cast(b, a.dtype)
        ga = e.op("Mul", g, e.op("Mul", bf, e.op("Pow", a, e.op("Sub", bf, e.scalar(1.0, bf)))))
    if needs[1]:
        gb = e.op("Mul", g, e.op("Mul", y, e.op("Log", a)))
    return [ga, gb]


@rule("Max", "Min")
def _max_min(e, node, grads, needs):
    g, y = grads[0], _y(node)
    return [
        e.op("Mul", g, e.cast(e.op("Equal", x, y), g.dtype)) if need else None
        for x, need in zip(node.inputs, needs, strict=True)
    ]


@rule("Where")
def _where(e, node, grads, needs):
    g, cond = grads[0], _x(node, 0)
    zero = e.scalar(0.0, g)
    return [
        None,
        e.op("Where", cond, g, zero) if needs[1] else None,
        e.op("Where", cond, zero, g) if needs[2] else None,
    ]


@rule("PRelu")
def _prelu(e, node, grads, needs):
    g, x, slope = grads[0], _x(node, 0), _x(node, 1)
    pos = e.op("Greater", x, e.scalar(0.0, x))
    zero = e.scalar(0.0, x)
    return [
        e.op("Where", pos, g, e.op("Mul", g, slope)) if needs[0] else None,
        e.op("Where", pos, zero, e.op("Mul", g, x)) if needs[1] else None,
    ]


@rule("Mod")
def _mod(e, node, grads, needs):
    """y = a - b·q with q = floor(a/b) (fmod=0) or trunc(a/b) (fmod=1), q locally constant."""
    g, a, b = grads[0], _x(node, 0), _x(node, 1)
    gb = None
    if needs[1]:
        ratio = e.op("Div", a, b)
        q = e.op("Floor", ratio, shape=shape_of(ratio))
        if node.attributes.get_int("fmod", 0):
            q = e.op(
                "Mul", e.op("Sign", ratio), e.op("Floor", e.op("Abs", ratio), shape=shape_of(ratio))
            )
        gb = e.op("Neg", e.op("Mul", g, q))
    return [g, gb]


# -- contractions ---------------------------------------------------------------------------


def _swap_last(e: Emitter, x: ir.Value) -> ir.Value:
    r = len(shape_of(x))
    return e.transpose(x, [*range(r - 2), r - 1, r - 2])


@rule("MatMul")
def _matmul(e, node, grads, needs):
    """gA = g·Bᵀ, gB = Aᵀ·g; a 2-D B under a batched A gets one flattened 2-D product."""
    a, b, g = _x(node, 0), _x(node, 1), grads[0]
    sa, sb = shape_of(a), shape_of(b)
    a2 = e.reshape(a, (1, sa[0])) if len(sa) == 1 else a
    b2 = e.reshape(b, (sb[0], 1)) if len(sb) == 1 else b
    sa2, sb2 = shape_of(a2), shape_of(b2)
    batch = tuple(np.broadcast_shapes(sa2[:-2], sb2[:-2]))
    g2 = e.reshape(g, (*batch, sa2[-2], sb2[-1]))
    ga = gb = None
    if needs[0]:
        ga = e.matmul(g2, _swap_last(e, b2))
        if len(sa) == 1:  # drop the unit row; the walker sums the batch dims
            ga = e.reshape(ga, (*batch, sa[0]))
    if needs[1]:
        if len(sb) == 2 and len(sa2) > 2:
            k, n = sa2[-1], sb2[-1]
            flat_a = e.reshape(a2, (numel(a2) // k, k))
            gb = e.matmul(e.transpose(flat_a, [1, 0]), e.reshape(g2, (numel(g2) // n, n)))
        else:
            gb = e.matmul(_swap_last(e, a2), g2)
            if len(sb) == 1:
                gb = e.reshape(gb, (*batch, sb[0]))
    return [ga, gb]


@rule("Gemm")
def _gemm(e, node, grads, needs):
    """Y = α·op(A)·op(B) + β·C; each gradient is one Gemm with the transposes swapped."""
    a, b, g = _x(node, 0), _x(node, 1), grads[0]
    ta, tb = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
    alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)

    def gemm(p: ir.Value, q: ir.Value, tp: int, tq: int) -> ir.Value:
        rows = shape_of(p)[1 if tp else 0]
        cols = shape_of(q)[0 if tq else 1]
        return e.op("Gemm", p, q, shape=(rows, cols), alpha=alpha, transA=tp, transB=tq)

    ga = gb = gc = None
    if needs[0]:
        ga = gemm(b, g, tb, 1) if ta else gemm(g, b, 0, 1 - tb)
    if needs[1]:
        gb = gemm(g, a, 1, ta) if tb else gemm(a, g, 1 - ta, 0)
    if len(needs) > 2 and needs[2]:
        gc = g if beta == 1.0 else e.op("Mul", g, e.scalar(beta, g))
    return [ga, gb, gc]


def _einsum_terms(node: ir.Node) -> tuple[list[str], str]:
    """The equation's operand and output terms with '...' spelled out as letters (so a
    gradient equation may drop broadcast dims) and the implicit output made explicit."""
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
    ranks = [len(shape_of(_x(node, i))) - len(t.replace("...", "")) for i, t in enumerate(terms)]
    width = max([r for t, r in zip(terms, ranks, strict=True) if "..." in t], default=0)
    dims = "".join(spare[:width])
    terms = [t.replace("...", dims[width - r :]) for t, r in zip(terms, ranks, strict=True)]
    if not arrow:
        seen = "".join(terms)
        out = "..." + "".join(sorted(c for c in set(seen) if seen.count(c) == 1 and c not in dims))
    return terms, out.replace("...", dims)


@rule("Einsum")
def _einsum(e, node, grads, needs):
    """Operand i's gradient contracts g with the other operands onto operand i's letters;
    letters only operand i has are summed in the forward, so they come back by Expand."""
    terms, out = _einsum_terms(node)
    g = grads[0]
    result: Grads = []
    for i, (term, need) in enumerate(zip(terms, needs, strict=True)):
        if not need:
            result.append(None)
            continue
        letters = term
        if len(set(term)) != len(term):
            raise _unsupported(node, f"repeated index in '{term}'")
        others = [t for j, t in enumerate(terms) if j != i]
        known = set(out + "".join(others))
        kept = "".join(c for c in letters if c in known)
        x = _x(node, i)
        shape = shape_of(x)
        sizes = dict(zip(letters, shape, strict=True))
        kept_shape = tuple(sizes[c] for c in letters if c in known)
        eq = ",".join([out, *others]) + "->" + kept
        operands = [g, *(_x(node, j) for j in range(len(terms)) if j != i)]
        gx = e.op("Einsum", *operands, shape=kept_shape, equation=eq)
        full = tuple(sizes[c] if c in known else 1 for c in letters)
        result.append(e.expand(e.reshape(gx, full), shape))
    return result


# -- reductions and normalizations ----------------------------------------------------------


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The reduced axes, or None for an identity (empty axes with noop_with_empty_axes)."""
    rank = len(shape_of(_x(node)))
    axes = _ints(node, "axes", 1) or []
    if not axes:
        return None if node.attributes.get_int("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


@rule(
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceLogSum",
    "ReduceProd",
)
def _reduce(e, node, grads, needs):
    x, g = _x(node), grads[0]
    axes = _reduce_axes(node)
    if axes is None:
        return [g, None]
    shape = shape_of(x)
    keep = tuple(1 if i in axes else d for i, d in enumerate(shape))
    gx = e.expand(e.reshape(g, keep), shape)
    op = node.op_type
    y = e.reshape(_y(node), keep) if op not in ("ReduceSum", "ReduceMean") else None
    if op == "ReduceMean":
        gx = e.op("Div", gx, e.scalar(math.prod(shape[a] for a in axes), x))
    elif op in ("ReduceMax", "ReduceMin"):
        gx = e.op("Mul", gx, e.cast(e.op("Equal", x, y), gx.dtype))
    elif op == "ReduceSumSquare":
        gx = e.op("Mul", gx, e.op("Mul", x, e.scalar(2.0, x)))
    elif op == "ReduceL1":
        gx = e.op("Mul", gx, e.op("Sign", x))
    elif op == "ReduceL2":
        gx = e.op("Mul", gx, e.op("Div", x, y))
    elif op == "ReduceLogSumExp":
        gx = e.op("Mul", gx, e.op("Exp", e.op("Sub", x, y)))
    elif op == "ReduceLogSum":
        gx = e.op("Div", gx, e.op("Exp", y))
    elif op == "ReduceProd":
        gx = e.op("Mul", gx, e.op("Div", y, x))
    return [gx, None]


@rule("Softmax")
def _softmax(e, node, grads, needs):
    y, g = _y(node), grads[0]
    axis = node.attributes.get_int("axis", -1)
    dot = e.reduce("ReduceSum", e.op("Mul", g, y), [axis], keepdims=True)
    return [e.op("Mul", y, e.op("Sub", g, dot))]


@rule("LogSoftmax")
def _log_softmax(e, node, grads, needs):
    y, g = _y(node), grads[0]
    total = e.reduce("ReduceSum", g, [node.attributes.get_int("axis", -1)], keepdims=True)
    return [e.op("Sub", g, e.op("Mul", e.op("Exp", y), total))]


def _normalized(e: Emitter, x: ir.Value, axes: list[int], eps: float) -> tuple[ir.Value, ir.Value]:
    """Recompute x̂ = (x - mean)·rstd and rstd over ``axes`` (cheaper than saving them)."""
    xc = e.op("Sub", x, e.reduce("ReduceMean", x, axes, keepdims=True))
    var = e.reduce("ReduceMean", e.op("Mul", xc, xc), axes, keepdims=True)
    rstd = e.op("Reciprocal", e.op("Sqrt", e.op("Add", var, e.scalar(eps, x))))
    return e.op("Mul", xc, rstd), rstd


def _normalize_vjp(
    e: Emitter, xhat: ir.Value, rstd: ir.Value, g_xhat: ir.Value, axes: list[int]
) -> ir.Value:
    """gx = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) over the normalized axes."""
    m1 = e.reduce("ReduceMean", g_xhat, axes, keepdims=True)
    m2 = e.reduce("ReduceMean", e.op("Mul", g_xhat, xhat), axes, keepdims=True)
    return e.op("Mul", rstd, e.op("Sub", e.op("Sub", g_xhat, m1), e.op("Mul", xhat, m2)))


@rule("LayerNormalization")
def _layer_norm(e, node, grads, needs):
    x, scale, g = _x(node, 0), _x(node, 1), grads[0]
    if g is None:
        raise _unsupported(node, "gradients through its Mean/InvStdDev outputs")
    rank = len(shape_of(x))
    axes = list(range(node.attributes.get_int("axis", -1) % rank, rank))
    xhat, rstd = _normalized(e, x, axes, node.attributes.get_float("epsilon", 1e-5))
    gx = _normalize_vjp(e, xhat, rstd, e.op("Mul", g, scale), axes) if needs[0] else None
    gs = e.op("Mul", g, xhat) if needs[1] else None
    gb = g if len(needs) > 2 and needs[2] else None
    return [gx, gs, gb]


@rule("BatchNormalization", "InstanceNormalization")
def _channel_norm(e, node, grads, needs):
    """Training-mode BatchNorm (statistics over all but the channel dim; the training pass
    switches BatchNorm to training mode) and InstanceNorm (over the spatial dims)."""
    x, scale, g = _x(node, 0), _x(node, 1), grads[0]
    if node.op_type == "BatchNormalization" and not node.attributes.get_int("training_mode", 0):
        raise _unsupported(node, "training_mode=0 (running statistics)")
    if g is None:
        raise _unsupported(node, "gradients through its running-statistics outputs")
    shape = shape_of(x)
    first = 0 if node.op_type == "BatchNormalization" else 2
    axes = [a for a in range(first, len(shape)) if a != 1]
    per_channel = (1, shape[1], *[1] * (len(shape) - 2))
    xhat, rstd = _normalized(e, x, axes, node.attributes.get_float("epsilon", 1e-5))
    gx = None
    if needs[0]:
        gx = _normalize_vjp(e, xhat, rstd, e.op("Mul", g, e.reshape(scale, per_channel)), axes)
    not_channel = [a for a in range(len(shape)) if a != 1]
    gs = e.reduce("ReduceSum", e.op("Mul", g, xhat), not_channel, False) if needs[1] else None
    gb = e.reduce("ReduceSum", g, not_channel, False) if needs[2] else None
    return [gx, gs, gb, *[None] * (len(node.inputs) - 3)]


# -- data movement --------------------------------------------------------------------------


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _view(e, node, grads, needs):
    return [e.reshape(grads[0], shape_of(_x(node))), *[None] * (len(node.inputs) - 1)]


@rule("Transpose")
def _transpose(e, node, grads, needs):
    rank = len(shape_of(_x(node)))
    perm = _ints(node, "perm") or list(reversed(range(rank)))
    return [e.transpose(grads[0], [int(i) for i in np.argsort(perm)])]


@rule("Expand")
def _expand(e, node, grads, needs):
    return [grads[0], None]


@rule("Tile")
def _tile(e, node, grads, needs):
    """Output dim i is (repeat_i, d_i) row-major; sum the repeat dims."""
    shape = shape_of(_x(node))
    repeats = _ints(node, "repeats", 1) or []
    split = tuple(v for r, d in zip(repeats, shape, strict=True) for v in (r, d))
    summed = e.reduce("ReduceSum", e.reshape(grads[0], split), range(0, len(split), 2), False)
    return [summed, None]


@rule("Slice")
def _slice(e, node, grads, needs):
    """Strided axes scatter back one at a time; unit-stride axes become one Pad."""
    x, g = _x(node), grads[0]
    shape = shape_of(x)
    starts, ends = _ints(node, "starts", 1) or [], _ints(node, "ends", 2) or []
    axes = _ints(node, "axes", 3) or list(range(len(starts)))
    steps = _ints(node, "steps", 4) or [1] * len(starts)
    pads = [0] * (2 * len(shape))
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis %= len(shape)
        first, stop, step = slice(start, end, step).indices(shape[axis])
        picked = np.arange(first, stop, step)
        if step == 1:
            pads[axis], pads[len(shape) + axis] = first, shape[axis] - stop
            continue
        cur = list(shape_of(g))
        full = (*cur[:axis], shape[axis], *cur[axis + 1 :])
        index = np.broadcast_to(
            picked.reshape([-1 if i == axis else 1 for i in range(len(cur))]), cur
        )
        g = e.op(
            "ScatterElements",
            e.zeros(full, g.dtype),
            e.const(index.astype(np.int64)),
            g,
            shape=full,
            axis=axis,
        )
    if any(pads):
        g = e.op("Pad", g, e.ints(pads), shape=shape)
    return [g, *[None] * (len(node.inputs) - 1)]


@rule("Pad")
def _pad(e, node, grads, needs):
    x, g = _x(node), grads[0]
    if node.attributes.get_string("mode", "constant") != "constant":
        raise _unsupported(node, f"mode={node.attributes.get_string('mode')}")
    shape = shape_of(x)
    pads = _ints(node, "pads", 1) or []
    axes = _ints(node, "axes", 3) or list(range(len(shape)))
    starts = [pads[k] for k in range(len(axes))]
    ends = [s + shape[a % len(shape)] for s, a in zip(starts, axes, strict=True)]
    return [
        e.op("Slice", g, e.ints(starts), e.ints(ends), e.ints(axes), shape=shape),
        *[None] * (len(node.inputs) - 1),
    ]


@rule("Concat")
def _concat(e, node, grads, needs):
    g = grads[0]
    axis = node.attributes.get_int("axis", 0) % len(shape_of(g))
    sizes = [shape_of(v)[axis] for v in node.inputs]
    shapes = [shape_of(v) for v in node.inputs]
    parts = e.op_multi("Split", [g, e.ints(sizes)], shapes, [g.dtype] * len(sizes), axis=axis)
    return [p if need else None for p, need in zip(parts, needs, strict=True)]


@rule("Split")
def _split(e, node, grads, needs):
    present = [g for g in grads if g is not None]
    parts = [
        g if g is not None else e.zeros(shape_of(o), present[0].dtype)
        for g, o in zip(grads, node.outputs, strict=True)
    ]
    axis = node.attributes.get_int("axis", 0)
    out = e.op("Concat", *parts, shape=shape_of(_x(node)), axis=axis)
    return [out, *[None] * (len(node.inputs) - 1)]


def _scatter_add_rows(e: Emitter, rows: int, index: ir.Value, g: ir.Value) -> ir.Value:
    """zeros(rows, *rest) with each g[k] added at row index[k]. ScatterElements, not
    ScatterND: onnxruntime's ScatterND add races on repeated indices (wrong sums)."""
    ishape = shape_of(index)
    rest = shape_of(g)[len(ishape) :]
    k = math.prod(ishape)
    flat_g = e.reshape(g, (k, *rest))
    idx = e.expand(e.reshape(index, (k, *[1] * len(rest))), (k, *rest))
    return e.op(
        "ScatterElements",
        e.zeros((rows, *rest), g.dtype),
        idx,
        flat_g,
        shape=(rows, *rest),
        axis=0,
        reduction="add",
    )


@rule("Gather")
def _gather(e, node, grads, needs):
    """Scatter-add rows back (embeddings); a non-zero axis is moved to the front and back."""
    data, index, g = _x(node, 0), _x(node, 1), grads[0]
    shape, ishape = shape_of(data), shape_of(index)
    axis = node.attributes.get_int("axis", 0) % len(shape)
    ni = len(ishape)
    if axis:
        gr = len(shape_of(g))
        g = e.transpose(g, [*range(axis, axis + ni), *range(axis), *range(axis + ni, gr)])
    out = _scatter_add_rows(e, shape[axis], index, g)
    if axis:
        order = [axis, *range(axis), *range(axis + 1, len(shape))]
        out = e.transpose(out, [int(i) for i in np.argsort(order)])
    return [out, None]


@rule("GatherElements")
def _gather_elements(e, node, grads, needs):
    data, g = _x(node, 0), grads[0]
    shape = shape_of(data)
    out = e.op(
        "ScatterElements",
        e.zeros(shape, g.dtype),
        _x(node, 1),
        g,
        shape=shape,
        axis=node.attributes.get_int("axis", 0),
        reduction="add",
    )
    return [out, None]


@rule("GatherND")
def _gather_nd(e, node, grads, needs):
    """GatherND over the first r dims is a Gather of the flattened dims at the linear index."""
    if node.attributes.get_int("batch_dims", 0):
        raise _unsupported(node, "batch_dims > 0")
    data, index = _x(node, 0), _x(node, 1)
    shape, ishape = shape_of(data), shape_of(index)
    r = ishape[-1]
    lead = shape[:r]
    strides = [math.prod(lead[j + 1 :]) for j in range(r)]
    wrapped = e.op("Mod", index, e.ints(lead), shape=ishape, dtype=index.dtype)
    linear = e.reduce("ReduceSum", e.op("Mul", wrapped, e.ints(strides)), [-1], keepdims=False)
    rows = _scatter_add_rows(e, math.prod(lead), linear, grads[0])
    return [e.reshape(rows, shape), None]


@rule("ScatterElements", "ScatterND")
def _scatter(e, node, grads, needs):
    """Scattered-over positions of data get no gradient (unless accumulated); the updates get
    the gradient gathered at their positions."""
    g, index, updates = grads[0], _x(node, 1), _x(node, 2)
    reduction = node.attributes.get_string("reduction", "none")
    if reduction not in ("none", "add"):
        raise _unsupported(node, f"reduction={reduction}")
    axis = {"axis": node.attributes.get_int("axis", 0)} if node.op_type == "ScatterElements" else {}
    gd = gu = None
    if needs[0]:
        gd = (
            g
            if reduction == "add"
            else e.op(
                node.op_type,
                g,
                index,
                e.zeros(shape_of(updates), g.dtype),
                shape=shape_of(g),
                **axis,
            )
        )
    if needs[2]:
        gather = "GatherElements" if node.op_type == "ScatterElements" else "GatherND"
        gu = e.op(gather, g, index, shape=shape_of(updates), **axis)
    return [gd, None, gu]


@rule("TopK")
def _topk(e, node, grads, needs):
    x, g = _x(node), grads[0]
    shape = shape_of(x)
    out = e.op(
        "ScatterElements",
        e.zeros(shape, g.dtype),
        node.outputs[1],
        g,
        shape=shape,
        axis=node.attributes.get_int("axis", -1),
        reduction="add",
    )
    return [out, None]


@rule("CumSum")
def _cumsum(e, node, grads, needs):
    reverse = 1 - node.attributes.get_int("reverse", 0)
    out = e.op(
        "CumSum",
        grads[0],
        _x(node, 1),
        shape=shape_of(_x(node)),
        reverse=reverse,
        exclusive=node.attributes.get_int("exclusive", 0),
    )
    return [out, None]


@rule("Trilu")
def _trilu(e, node, grads, needs):
    k = [node.inputs[1]] if len(node.inputs) > 1 and node.inputs[1] is not None else []
    out = e.op(
        "Trilu", grads[0], *k, shape=shape_of(_x(node)), upper=node.attributes.get_int("upper", 1)
    )
    return [out, None]


def _block_layout(node: ir.Node, shape: tuple[int, ...], block: int) -> tuple[tuple, list[int]]:
    """DepthToSpace as reshape → transpose: the 6-D layout of the input and the permutation."""
    n, c, h, w = shape
    if node.attributes.get_string("mode", "DCR") == "CRD":
        return (n, c // block**2, block, block, h, w), [0, 1, 4, 2, 5, 3]
    return (n, block, block, c // block**2, h, w), [0, 3, 4, 1, 5, 2]


@rule("DepthToSpace", "SpaceToDepth")
def _depth_space(e, node, grads, needs):
    """Both are a reshape-transpose-reshape; the gradient runs that chain backwards."""
    block = node.attributes.get_int("blocksize", 1)
    x, g = _x(node), grads[0]
    if node.op_type == "DepthToSpace":
        layout, perm = _block_layout(node, shape_of(x), block)
        moved = tuple(layout[p] for p in perm)
        back = e.transpose(e.reshape(g, moved), [int(i) for i in np.argsort(perm)])
    else:  # x (n, c, h·b, w·b) -> (n, c, h, b, w, b) -> (n, b, b, c, h, w)
        n, c, hb, wb = shape_of(x)
        layout = (n, c, hb // block, block, wb // block, block)
        perm = [0, 3, 5, 1, 2, 4]
        moved = tuple(layout[p] for p in perm)
        back = e.transpose(e.reshape(g, moved), [int(i) for i in np.argsort(perm)])
    return [e.reshape(back, shape_of(x))]


# -- convolution and pooling ----------------------------------------------------------------


def _window(
    node: ir.Node, in_sp: tuple[int, ...], out_sp: tuple[int, ...], kernel: list[int]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Strides, dilations, begin pads, end pads with auto_pad resolved against static shapes."""
    nsp = len(in_sp)
    strides = _ints(node, "strides") or [1] * nsp
    dilations = _ints(node, "dilations") or [1] * nsp
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [
            max(0, (o - 1) * s + (k - 1) * d + 1 - i)
            for i, o, k, s, d in zip(in_sp, out_sp, kernel, strides, dilations, strict=True)
        ]
        small = [t // 2 for t in total]
        if auto == "SAME_LOWER":
            small = [t - s for t, s in zip(total, small, strict=True)]
        begin = small
        return strides, dilations, begin, [t - b for t, b in zip(total, begin, strict=True)]
    pads = _ints(node, "pads") or [0] * (2 * nsp)
    if auto == "VALID":
        pads = [0] * (2 * nsp)
    return strides, dilations, pads[:nsp], pads[nsp:]


def _transposed_conv(
    e: Emitter,
    g: ir.Value,
    w: ir.Value,
    x_shape: tuple[int, ...],
    kernel: list[int],
    geometry,
    group: int,
) -> ir.Value:
    """The input gradient of a convolution: ConvTranspose back onto the input's shape."""
    strides, dilations, begin, end = geometry
    g_sp = shape_of(g)[2:]
    natural = [
        s * (o - 1) + (k - 1) * d + 1 - b - p
        for o, k, s, d, b, p in zip(g_sp, kernel, strides, dilations, begin, end, strict=True)
    ]
    extra = [i - n for i, n in zip(x_shape[2:], natural, strict=True)]
    return e.op(
        "ConvTranspose",
        g,
        w,
        shape=x_shape,
        strides=strides,
        dilations=dilations,
        pads=[*begin, *end],
        group=group,
        output_padding=extra,
        kernel_shape=kernel,
    )


def _conv_weight_grad(
    e: Emitter, x: ir.Value, g: ir.Value, kernel: list[int], geometry, group: int
) -> ir.Value:
    """dW of y = conv(x, W): a convolution of x with g where the batch plays the channel role
    (strides and dilations swap), grouped the same way, cropped to the kernel."""
    strides, dilations, begin, end = geometry
    xs, gs = shape_of(x), shape_of(g)
    nsp = len(kernel)
    n, cig, cog = xs[0], xs[1] // group, gs[1] // group
    sp = list(range(3, 3 + nsp))
    xt = e.reshape(
        e.transpose(e.reshape(x, (n, group, cig, *xs[2:])), [2, 1, 0, *sp]),
        (cig, group * n, *xs[2:]),
    )
    gt = e.reshape(
        e.transpose(e.reshape(g, (n, group, cog, *gs[2:])), [1, 2, 0, *sp]),
        (group * cog, n, *gs[2:]),
    )
    full = [
        (i + b + p - ((o - 1) * s + 1)) // d + 1
        for i, o, s, d, b, p in zip(xs[2:], gs[2:], strides, dilations, begin, end, strict=True)
    ]
    corr = e.op(
        "Conv",
        xt,
        gt,
        shape=(cig, group * cog, *full),
        strides=dilations,
        dilations=strides,
        pads=[*begin, *end],
        group=group,
        kernel_shape=list(gs[2:]),
    )
    if full != kernel:
        corr = e.op(
            "Slice",
            corr,
            e.ints([0] * nsp),
            e.ints(kernel),
            e.ints(range(2, 2 + nsp)),
            shape=(cig, group * cog, *kernel),
        )
    return e.transpose(corr, [1, 0, *range(2, 2 + nsp)])


def _bias_grad(e: Emitter, g: ir.Value) -> ir.Value:
    return e.reduce("ReduceSum", g, [0, *range(2, len(shape_of(g)))], keepdims=False)


@rule("Conv")
def _conv(e, node, grads, needs):
    x, w, g = _x(node, 0), _x(node, 1), grads[0]
    kernel = list(shape_of(w)[2:])
    group = node.attributes.get_int("group", 1)
    geometry = _window(node, shape_of(x)[2:], shape_of(g)[2:], kernel)
    gx = _transposed_conv(e, g, w, shape_of(x), kernel, geometry, group) if needs[0] else None
    gw = _conv_weight_grad(e, x, g, kernel, geometry, group) if needs[1] else None
    gb = _bias_grad(e, g) if len(needs) > 2 and needs[2] else None
    return [gx, gw, gb]


@rule("ConvTranspose")
def _conv_transpose(e, node, grads, needs):
    """y = convT(x, W) is the input gradient of a conv from y's shape to x's shape, so
    gX = conv(g, W) and gW is that conv's weight gradient with (input, output) = (g, x)."""
    x, w, g = _x(node, 0), _x(node, 1), grads[0]
    kernel = list(shape_of(w)[2:])
    group = node.attributes.get_int("group", 1)
    geometry = _window(node, shape_of(g)[2:], shape_of(x)[2:], kernel)
    strides, dilations, begin, end = geometry
    gx = gw = None
    if needs[0]:
        gx = e.op(
            "Conv",
            g,
            w,
            shape=shape_of(x),
            strides=strides,
            dilations=dilations,
            pads=[*begin, *end],
            group=group,
            kernel_shape=kernel,
        )
    if needs[1]:
        gw = _conv_weight_grad(e, g, x, kernel, geometry, group)
    gb = _bias_grad(e, g) if len(needs) > 2 and needs[2] else None
    return [gx, gw, gb]


@rule("MaxPool")
def _max_pool(e, node, grads, needs):
    """Route g to the argmax positions: the forward node also emits its Indices (flat over the
    whole input, row-major), and the gradient is a scatter-add of g onto them."""
    x, g = _x(node), grads[0]
    if node.attributes.get_int("storage_order", 0):
        raise _unsupported(node, "storage_order=1")
    if len(node.outputs) < 2:
        node.resize_outputs(2)
        indices = node.outputs[1]
        indices.name = e.names.fresh(f"{node.name}/indices")
        indices.shape = ir.Shape(list(shape_of(_y(node))))
        indices.type = ir.TensorType(ir.DataType.INT64)
    total = numel(x)
    flat_g = e.reshape(g, (numel(g),))
    flat_i = e.reshape(node.outputs[1], (numel(g),))
    out = e.op(
        "ScatterElements",
        e.zeros((total,), g.dtype),
        flat_i,
        flat_g,
        shape=(total,),
        axis=0,
        reduction="add",
    )
    return [e.reshape(out, shape_of(x))]


@rule("AveragePool")
def _average_pool(e, node, grads, needs):
    """Spread g/(window size) over each window: a depthwise ConvTranspose with a ones kernel."""
    x, g = _x(node), grads[0]
    xs, gs = shape_of(x), shape_of(g)
    if node.attributes.get_int("ceil_mode", 0):
        raise _unsupported(node, "ceil_mode=1")
    kernel = _ints(node, "kernel_shape") or []
    geometry = _window(node, xs[2:], gs[2:], kernel)
    strides, dilations, begin, end = geometry
    if node.attributes.get_int("count_include_pad", 0) or not any(begin + end):
        divisor = np.full(gs[2:], float(math.prod(kernel)))
    else:  # windows clipped at the border count only the in-bounds elements
        counts = []
        for i, o, k, s, d, b in zip(xs[2:], gs[2:], kernel, strides, dilations, begin, strict=True):
            taps = np.arange(o)[:, None] * s - b + np.arange(k)[None, :] * d
            counts.append(((taps >= 0) & (taps < i)).sum(axis=1))
        divisor = np.ones(gs[2:])
        for axis, c in enumerate(counts):
            divisor = divisor * c.reshape([-1 if a == axis else 1 for a in range(len(counts))])
    assert g.dtype is not None
    scaled = e.op("Div", g, e.const(divisor.astype(g.dtype.numpy())))
    ones = e.const(np.ones((xs[1], 1, *kernel), dtype=g.dtype.numpy()))
    return [_transposed_conv(e, scaled, ones, xs, kernel, geometry, xs[1])]


@rule("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(e, node, grads, needs):
    x, g = _x(node), grads[0]
    shape = shape_of(x)
    gx = e.expand(g, shape)
    if node.op_type == "GlobalAveragePool":
        return [e.op("Div", gx, e.scalar(math.prod(shape[2:]), x))]
    return [e.op("Mul", gx, e.cast(e.op("Equal", x, _y(node)), gx.dtype))]
