"""Rule (TensorRT): rewrite GPTBigCode's folded-heads MQA attention into the broadcast form TensorRT fuses.

Pattern (the export's form, one K/V head shared by H query heads folded into the rows):
    q3 = Reshape(q_scaled)                    (B, T*H, D)   from q_scaled (B, T, E), E = H * D
    s  = Reshape(MatMul(q3, Transpose(k)))    (B, T, H, S)  k (B, S, D), perm (0, 2, 1)
    p  = bigcode::FusedMaskedSoftmax(s, mask) mask (B, T, 1, S)
    o  = Reshape(MatMul(Reshape(p), v))       (B, T*H, S) -> (B, T*H, D) -> (B, T, E)
Check: op types come from the pattern; the check reads the Transpose perm and what each Reshape produces (its
constant shape entries, or the shape recorded on its output), and the K, V and mask ranks, and returns the
first mismatch as its reason.
Rewrite (scale already on Q; K and V stay one head, [B, 1, S, D], never expanded to H copies):
    qh = Transpose(Reshape(q_scaled, [0, 0, H, D]), [0, 2, 1, 3])      (B, H, T, D)
    s  = MatMul(qh, Transpose(Unsqueeze(k, 1), [0, 1, 3, 2]))          (B, H, T, S)
    p  = bigcode::FusedMaskedSoftmax(s, Transpose(mask, [0, 2, 1, 3])) mask (B, 1, T, S), built once
    o  = Reshape(Transpose(MatMul(p, Unsqueeze(v, 1)), [0, 2, 1, 3]), [0, 0, E])
The softmax node keeps its attributes (per-layer unscale, fp32 softmax dtype), so numerics are unchanged up to
matmul summation order. MHA graphs are already in (B, H, T, D) form: the rule does not apply. Fires per layer.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus, RewriteRuleClassBase, RewriteRuleSet

from bigcode_deploy.graphs._ir import fail, format_dims, ok, reshape_dims, static_dims
from bigcode_deploy.runtime.manifest import DOMAIN, MASKED_SOFTMAX

NAME = "mqa_broadcast_attention"
KEY_PERM = (0, 2, 1)


def _heads(q_scaled: ir.Value, key: ir.Value) -> tuple[int, int] | str:
    """(H, D) from q_scaled (B, T, E) and key (B, S, D), or the reason they cannot be told."""
    q_dims, k_dims = static_dims(q_scaled), static_dims(key)
    if k_dims is None or len(k_dims) != 3:
        return f"the key is {format_dims(k_dims)} where (batch, keys, head_dim) is needed: not a multi-query graph"
    if q_dims is None or len(q_dims) != 3:
        return f"the scaled query is {format_dims(q_dims)} where (batch, sequence, embed) is needed"
    head_dim, embed = k_dims[2], q_dims[2]
    if head_dim is None or embed is None or embed % head_dim:
        return f"head_dim ({head_dim}) or the embedding width ({embed}) is not static, or does not divide it"
    return embed // head_dim, head_dim


def _expect(what: str, dims: list[int | None] | None, needed: dict[int, int | None], rank: int, form: str) -> str:
    """'' when dims has the rank and the static entries needed (None: any), else the reason."""
    if dims is None or len(dims) != rank or any(dims[i] is not None and dims[i] != v for i, v in needed.items()):
        return f"{what} gives {format_dims(dims)} where {form} is needed"
    if any(v is not None and dims[i] is None for i, v in needed.items()):
        return f"{what} gives {format_dims(dims)}: cannot tell it is {form}"
    return ""


class MqaBroadcastAttention(RewriteRuleClassBase):
    """The folded-heads MQA attention around one bigcode::FusedMaskedSoftmax -> the broadcast-heads form."""

    def __init__(self) -> None:
        super().__init__(name=NAME)
        self._masks: dict[ir.Value, ir.Value] = {}

    def setup(self) -> None:
        self._masks = {}  # one transposed mask per mask value, shared by the layers of one graph

    def pattern(self, op, q_scaled, q_shape, key, scores_shape, mask, probs_shape, value, out_shape):
        q_rows = op.Reshape(q_scaled, q_shape, _outputs=["q_rows"])
        key_t = op.Transpose(key, _outputs=["key_t"])
        scores = op.Reshape(op.MatMul(q_rows, key_t), scores_shape, _outputs=["scores"])
        probs = op.FusedMaskedSoftmax(scores, mask, _domain=DOMAIN, _outputs=["probs"])
        probs_rows = op.Reshape(probs, probs_shape, _outputs=["probs_rows"])
        return op.Reshape(op.MatMul(probs_rows, value), out_shape, _outputs=["out"])

    def check(self, context, q_scaled, key, value, mask, q_rows, key_t, scores, probs_rows, out, **_) -> MatchResult:
        """Success, or MatchResult().fail(reason) naming the first perm, shape or rank that differs."""
        perm = key_t.producer().attributes.get_ints("perm")
        if perm is None or tuple(perm) != KEY_PERM:
            return fail(f"the key Transpose perm {tuple(perm) if perm else 'reversed'} where {KEY_PERM} is needed")
        heads = _heads(q_scaled, key)
        if isinstance(heads, str):
            return fail(heads)
        H, D = heads
        reasons = [
            _expect("the query Reshape", reshape_dims(q_rows.producer()), {2: D}, 3, f"(batch, sequence*{H}, {D})"),
            _expect("the scores Reshape", reshape_dims(scores.producer()), {2: H}, 4, f"(batch, sequence, {H}, keys)"),
            _expect(
                "the probabilities Reshape", reshape_dims(probs_rows.producer()), {}, 3, f"(batch, sequence*{H}, keys)"
            ),
            _expect("the output Reshape", reshape_dims(out.producer()), {2: H * D}, 3, f"(batch, sequence, {H * D})"),
            _expect("the value", static_dims(value), {2: D}, 3, f"(batch, keys, {D})"),
            _expect("the mask", static_dims(mask), {2: 1}, 4, "(batch, sequence, 1, keys)"),
        ]
        reason = next((r for r in reasons if r), "")
        return fail(reason) if reason else ok()

    def rewrite(self, op, q_scaled, key, value, mask, probs, **_):
        H, D = _heads(q_scaled, key)
        q = op.Transpose(op.Reshape(q_scaled, op.Constant(value_ints=[0, 0, H, D])), perm=[0, 2, 1, 3])  # (B, H, T, D)
        kv_head_axis = op.Constant(value_ints=[1])
        k = op.Transpose(op.Unsqueeze(key, kv_head_axis), perm=[0, 1, 3, 2])  # (B, 1, D, S)
        if mask not in self._masks:
            self._masks[mask] = op.Transpose(mask, perm=[0, 2, 1, 3])  # (B, 1, T, S)
        softmax = probs.producer()
        attrs = {name: attr.value for name, attr in softmax.attributes.items()}
        heads_probs = op.op(MASKED_SOFTMAX, op.MatMul(q, k), self._masks[mask], _domain=DOMAIN, **attrs)
        heads_out = op.MatMul(heads_probs, op.Unsqueeze(value, kv_head_axis))  # (B, H, T, D)
        return op.Reshape(op.Transpose(heads_out, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, H * D]))


RULE = MqaBroadcastAttention.rule()


def _candidate_root(softmax: ir.Node) -> ir.Node | str:
    """The output Reshape of the folded form after a softmax node (the pattern's root), or why there is none."""
    node, path = softmax, ("Reshape", "MatMul", "Reshape")
    for op_type in path:
        consumers = list(node.outputs[0].consumers())
        if len(consumers) != 1 or consumers[0].op_type != op_type:
            found = ", ".join(sorted(c.op_type for c in consumers)) or "nothing"
            return (
                f"the {DOMAIN}::{MASKED_SOFTMAX} output feeds {found} where Reshape -> MatMul -> Reshape "
                "(the folded-heads multi-query form) is needed"
            )
        node = consumers[0]
    return node


def check(model: ir.Model) -> MatchResult:
    """Success when the rule would fire at least once; else the reason for the first softmax node."""
    softmaxes = [n for n in model.graph if n.domain == DOMAIN and n.op_type == MASKED_SOFTMAX]
    if not softmaxes:
        return fail(f"no {DOMAIN}::{MASKED_SOFTMAX} node")
    first_reason = ""
    for softmax in softmaxes:
        root = _candidate_root(softmax)
        if isinstance(root, str):
            first_reason = first_reason or root
            continue
        tracer = MatchingTracer()
        if RULE.match(model, model.graph, root, tracer=tracer):
            return ok()
        infos = tracer.best_matches_map.get(RULE, [])
        reason = infos[0].match_result.reason if infos else "no match"
        if not infos or infos[0].status != MatchStatus.CONDITION_FAILED:
            reason = f"the attention around {DOMAIN}::{MASKED_SOFTMAX} is not the folded-heads pattern: {reason}"
        first_reason = first_reason or reason
    return fail(first_reason)


def apply(model: ir.Model) -> tuple[int, str | None]:
    """Rewrite every matching attention in the main graph; (count, None) or (0, the reason it did not fire)."""
    count = RewriteRuleSet([RULE]).apply_to_model(model)
    if count:
        RemoveUnusedNodesPass()(model)
        return count, None
    return 0, check(model).reason
