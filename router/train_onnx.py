"""The classifier's ONNX model, built from the fitted scikit-learn models (router/train.py), and
predictions through it.

to_onnx() is the shipped graph: it reads router.features' sparse feeds, so a call touches only the
weights of the n-grams a prompt has. reference_onnx() is skl2onnx's own dense conversion of the same
models, the reference the shipped graph is checked against; onnx_predict() runs a model on training
examples through the runtime's own feature path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from router import features as F
from router.train_data import Example
from router.types import TASK_TYPES

if TYPE_CHECKING:
    from router.train import Models


def to_onnx(models: Models) -> Any:
    """The shipped ONNX model, built from the fitted scikit-learn parameters, reading sparse input.

    Inputs (router.features.onnx_feeds), per call of b prompts padded to L n-gram slots: "indices"
    (b, L) int64 hashed columns of each prompt's n-grams (padding: column 0), "weights" (b, 6, L)
    float: row k < 3 holds TF-IDF block k's log1p counts tf at its n-grams and zeros elsewhere, row
    3 + k their squares; "handcrafted" (b, N_HANDCRAFTED). Outputs "task_probs" (b, 6) and "difficulty" (b,).

    The arithmetic is scikit-learn's: TfidfTransformer (tf * idf, then L2 norm per block),
    StandardScaler(with_mean=False) times the ColumnTransformer weight, then the two linear heads and
    the expert mixture. Because every step before the heads is linear per block up to the norm,
    the heads are applied first and divided by the block norm afterwards:
        head(block) = sum_j W[j] * idf[j] * tf_j / sqrt(sum_j idf[j]^2 * tf_j^2)
    so the graph gathers one 13-wide row per n-gram present (W*idf for the 6 + 6 head outputs, and
    idf^2) and one batched MatMul with "weights" gives both sums for every block, instead of
    multiplying an 18k-wide row that is 97% zeros. Measured slower in onnxruntime 1.32: ScatterElements with
    reduction, and a float64 running sum differenced at the segment bounds (the broadcast Mul of tf
    over the gathered rows alone cost ~11 ns per n-gram). reference_onnx() is skl2onnx's own
    conversion of the same models; train() checks both against scikit-learn.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pre = models.pre
    blocks = {name: trans for name, trans, _ in pre.transformers_}
    idf = np.concatenate([blocks[n].idf_ for n in ("words", "system", "chars")])
    assert len(idf) == F.N_HASHED
    scaler = blocks["handcrafted"]
    hand_scale = (pre.transformer_weights or {}).get("handcrafted", 1.0) / scaler.scale_
    k = len(TASK_TYPES)
    weights = np.vstack([models.task.coef_, models.experts.coef_]).T  # (N_FEATURES, 12)
    bias = np.concatenate([models.task.intercept_, models.experts.intercept_])
    table = np.hstack([weights[: F.N_HASHED] * idf[:, None], (idf * idf)[:, None]]).astype(np.float32)  # (N_HASHED, 13)
    hand = (weights[F.N_HASHED :] * hand_scale[:, None]).astype(np.float32)  # (N_HANDCRAFTED, 12)

    inits = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    n_heads = weights.shape[1]
    node = helper.make_node
    nodes = [
        node("Gather", [const("table", table), "indices"], ["rows"], axis=0),  # (b, L, 13): W*idf | idf^2
        # weights (b, 6, L): rows 0-2 hold each block's tf, rows 3-5 their squares, so one batched
        # product gives [block head sums | .] over [. | block squared norms]
        node("MatMul", ["weights", "rows"], ["sums"]),  # (b, 6, 13)
        node("Slice", ["sums", const("starts_heads", np.array([0, 0], np.int64)), const("ends_heads", np.array([3, n_heads], np.int64)), const("axes12", np.array([1, 2], np.int64))], ["seg_heads"]),
        node("Slice", ["sums", const("starts_sq", np.array([3, n_heads], np.int64)), const("ends_sq", np.array([6, n_heads + 1], np.int64)), "axes12"], ["seg_sq"]),
        node("Sqrt", ["seg_sq"], ["seg_norm"]),
        # scikit-learn leaves an all-zero block at zero; max() with a tiny value does the same
        node("Max", ["seg_norm", const("tiny", np.array(1e-30, np.float32))], ["seg_norm_safe"]),
        node("Div", ["seg_heads", "seg_norm_safe"], ["seg_out"]),  # (b, 3, 12)
        node("ReduceSum", ["seg_out", const("axis1", np.array([1], np.int64))], ["hashed_out"], keepdims=0),
        node("Gemm", ["handcrafted", const("hand_weights", hand), const("heads_bias", bias.astype(np.float32))], ["hand_out"]),
        node("Add", ["hashed_out", "hand_out"], ["heads_logits"]),
        node("Split", ["heads_logits", const("heads_split", np.array([k, n_heads - k], np.int64))], ["task_scores", "expert_logits"], axis=1),
        node("Softmax", ["task_scores"], ["task_probs"], axis=1),
        node("Sigmoid", ["expert_logits"], ["expert_wrong"]),
        node("Mul", ["task_probs", "expert_wrong"], ["weighted_wrong"]),
        node("ReduceSum", ["weighted_wrong", "axis1"], ["difficulty"], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "slots"]),
        helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["batch", 6, "slots"]),
        helper.make_tensor_value_info("handcrafted", TensorProto.FLOAT, ["batch", F.N_HANDCRAFTED]),
    ]
    outputs = [
        helper.make_tensor_value_info("task_probs", TensorProto.FLOAT, ["batch", k]),
        helper.make_tensor_value_info("difficulty", TensorProto.FLOAT, ["batch"]),
    ]
    graph = helper.make_graph(nodes, "ponder_classifier_sparse", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.producer_name = "ponder-train"
    onnx.checker.check_model(model)
    return model


def reference_onnx(models: Models) -> Any:
    """skl2onnx's conversion of the same fitted models, dense input "features" (n, N_FEATURES):
    the reference the shipped sparse graph is checked against (not shipped: it multiplies the
    whole 18k-wide row and is several times slower)."""
    from onnx import compose, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    opset = {"": 17, "ai.onnx.ml": 1}
    pre = convert_sklearn(models.pre, initial_types=[("features", FloatTensorType([None, F.N_FEATURES]))], target_opset=opset)
    nodes, inits = list(pre.graph.node), list(pre.graph.initializer)
    pre_out = pre.graph.output[0].name
    head_outputs = {}
    for prefix, head in (("task_", models.task), ("experts_", models.experts)):
        options = {id(head): {"zipmap": False}} if prefix == "task_" else None
        converted = convert_sklearn(head, initial_types=[("z", FloatTensorType([None, F.N_FEATURES]))], options=options, target_opset=opset)
        converted = compose.add_prefix(converted, prefix)
        for n in converted.graph.node:  # feed the head from the shared preprocessing output
            n.input[:] = [pre_out if name == prefix + "z" else name for name in n.input]
        nodes += converted.graph.node
        inits += converted.graph.initializer
        head_outputs[prefix] = converted.graph.output[-1].name
    import onnx

    nodes += [
        helper.make_node("Identity", [head_outputs["task_"]], ["task_probs"]),
        helper.make_node("Sigmoid", [head_outputs["experts_"]], ["expert_wrong"]),
        helper.make_node("Mul", ["task_probs", "expert_wrong"], ["weighted_wrong"]),
        helper.make_node("ReduceSum", ["weighted_wrong", "mix_axis"], ["difficulty"], keepdims=0),
    ]
    inits.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "mix_axis"))
    outputs = [
        helper.make_tensor_value_info("task_probs", onnx.TensorProto.FLOAT, [None, len(TASK_TYPES)]),
        helper.make_tensor_value_info("difficulty", onnx.TensorProto.FLOAT, [None]),
    ]
    graph = helper.make_graph(nodes, "ponder_classifier_reference", list(pre.graph.input), outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opset.items()])
    model.ir_version = pre.ir_version
    onnx.checker.check_model(model)
    return model


def onnx_predict(model_bytes: bytes, examples: Sequence[Example], chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """onnxruntime predictions for examples, through the runtime's own feature path."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    tasks, difficulties = [np.zeros((0, len(TASK_TYPES)), np.float32)], [np.zeros(0, np.float32)]
    for start in range(0, len(examples), chunk):
        sparse = F.featurize_messages_sparse([ex.messages for ex in examples[start : start + chunk]])
        task = np.zeros((len(sparse.handcrafted), len(TASK_TYPES)), np.float32)
        difficulty = np.zeros(len(sparse.handcrafted), np.float32)
        for rows, feeds in F.onnx_feeds(sparse):
            task[rows], difficulty[rows] = session.run(["task_probs", "difficulty"], feeds)
        tasks.append(task)
        difficulties.append(difficulty)
    return np.concatenate(tasks), np.concatenate(difficulties)
