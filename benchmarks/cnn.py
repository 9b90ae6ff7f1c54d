"""A ResNet-style image classifier built with onnx.helper: the GPU benchmark's model.

The example MLP is too small to keep a GPU busy (its batch of 128 is a few microseconds of work there), so the
GPU benchmark needs a model whose compute grows with the batch the way a vision model's does. This one is a
CIFAR-sized residual network: a 3x3 stem convolution, `blocks` residual blocks of two 3x3 convolutions at
`width` channels, global average pooling and a linear classifier. FP32 NCHW input [batch, 3, image, image].

It needs numpy and onnx only, so that the GPU host (which has no scikit-learn converters) can build it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "INPUT0"
OUTPUT = "OUTPUT0"
OPSET = 17
IR_VERSION = 8


def build_resnet_model(
    image: int = 32, width: int = 64, blocks: int = 4, classes: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """He-initialised convolutions, with each block's second one scaled down so that the residual sums stay
    O(1) through the blocks: outputs are finite and comparable across batch sizes with a tight tolerance."""
    rng = np.random.default_rng(seed)
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def conv(name: str, source: str, cin: int, cout: int, scale: float = 1.0) -> str:
        weight = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)) * scale
        bias = rng.standard_normal(cout) * 0.01
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"))
        initializers.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}_b"))
        nodes.append(
            helper.make_node(
                "Conv", [source, f"{name}_w", f"{name}_b"], [name], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        return name

    def relu(source: str) -> str:
        out = f"{source}_relu"
        nodes.append(helper.make_node("Relu", [source], [out], name=out))
        return out

    current = relu(conv("stem", INPUT, 3, width))
    for b in range(blocks):
        inner = relu(conv(f"block{b}_a", current, width, width))
        second = conv(f"block{b}_b", inner, width, width, scale=0.5)
        nodes.append(helper.make_node("Add", [second, current], [f"block{b}_sum"], name=f"block{b}_sum"))
        current = relu(f"block{b}_sum")
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1))
    fc = rng.standard_normal((classes, width)) / np.sqrt(width)
    initializers.append(numpy_helper.from_array(fc.astype(np.float32), "fc_w"))
    initializers.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], [OUTPUT], name="fc", transB=1))
    graph = helper.make_graph(
        nodes,
        "resnet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tensorgate-bench")
    model.ir_version = IR_VERSION
    return model


def resnet_config(
    name: str,
    *,
    image: int = 32,
    classes: int = 10,
    kind: str = "KIND_GPU",
    batching: bool = True,
    max_batch: int = 128,
    conv_algo_search: str | None = None,
    pad: str | None = None,
) -> str:
    """config.pbtxt for the network: dynamic batching with no queue delay (an idle instance never waits), or
    none, so that requests run one by one; `conv_algo_search` sets Triton's `cudnn_conv_algo_search`, `pad`
    tensorgate's `tensorgate.pad_batches` ("true", or sizes such as "1,8,32")."""
    text = (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch}\n'
        f'input [{{ name: "{INPUT}" data_type: TYPE_FP32 dims: [3, {image}, {image}] }}]\n'
        f'output [{{ name: "{OUTPUT}" data_type: TYPE_FP32 dims: [{classes}] }}]\n'
        f"instance_group [{{ kind: {kind} count: 1 }}]\n"
    )
    if batching:
        text += "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
    if pad:
        text += f'parameters {{ key: "tensorgate.pad_batches" value: {{ string_value: "{pad}" }} }}\n'
    if conv_algo_search is not None:
        text += f'parameters {{ key: "cudnn_conv_algo_search" value: {{ string_value: "{conv_algo_search}" }} }}\n'
    return text
