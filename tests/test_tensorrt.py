"""The TensorRT path without TensorRT: version rules, the builder configuration as data, the GPU/TensorRT build
record's checks, the attention-plugin graph pass, and the plugin kernel compiled ahead of time to PTX. The tests
that build and run plans carry the `tensorrt` marker and skip here with the reason (TensorRT cannot be installed
on this project's machines)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from soraedge.target.attention_plugin import to_plugin
from soraedge.target.attention_rewrite import match_attention
from soraedge.target.trt_build import (FORBIDDEN_FLAGS, BuildSettings, attention_graph, builder_plan, capabilities,
                                       plugin_arch, timing_cache_name)
from soraedge.fused_attention.trt_plugin import (FLASH, INT8, NAMESPACE, constant_value, plugin_functions,
                                                 strip_hidden_params)
from soraedge.runtime.errors import SoraError
from soraedge.runtime.gpu_target import mismatches, tensorrt_version
from soraedge.runtime.manifest import load_manifest


# -- versions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, attention, form", [
    ("10.3.0", "native", "decomposed"),  # JetPack 6: no ONNX Attention parser
    ("10.13.2", "native", "decomposed"),  # JetPack 7
    ("10.14.1", "native", "onnx-attention"),
    ("11.0.0", "native", "onnx-attention"),
    ("10.9.0", "plugin", "onnx-attention"),  # every Attention node becomes the plugin: the parser never sees one
    ("11.2.0", "plugin", "onnx-attention"),
    ("10.9.0", "int8", "onnx-attention"),
])
def test_the_export_form_follows_the_tensorrt_version(version, attention, form):
    assert attention_graph(version, attention) == form


@pytest.mark.parametrize("version, attention, exported, expect", [
    ("10.8.1", "plugin", None, "needs TensorRT 10.9 or newer"),
    ("10.8.1", "int8", None, "needs TensorRT 10.9 or newer"),
    ("10.3.0", "native", "onnx-attention", "re-export the ONNX with --attention decomposed"),
    ("11.0.0", "plugin", "decomposed", "re-export the ONNX with --attention onnx-attention"),
    ("10.2.0", "native", None, "older than 10.3"),
])
def test_impossible_combinations_are_refused(version, attention, exported, expect):
    with pytest.raises(SoraError, match=re.escape(expect)):
        attention_graph(version, attention, exported)


def test_a_decomposed_export_builds_natively_everywhere():
    assert attention_graph("11.0.0", "native", "decomposed") == "onnx-attention"  # accepted, not refused
    assert capabilities("10.9.0") == {"version": "10.9", "onnx_attention": False, "aot_plugins": True}


# -- the builder configuration as data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_spec(tiny_engines):
    return load_manifest(tiny_engines("tiny-a")).spec("transformer")


@pytest.mark.parametrize("settings", [BuildSettings(), BuildSettings(workspace_mb=2048, tactic_memory_mb=1024,
                                                                      optimization_level=5, version_compatible=True,
                                                                      hardware_compatible=True, refittable=True)])
@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_builder_plan(dit_spec, settings, version):
    plan = builder_plan(dit_spec, settings, version)
    assert plan["network_flags"] == ["STRONGLY_TYPED"]  # precision comes from the graph's casts and Q/DQ
    assert not FORBIDDEN_FLAGS & set(plan["builder_flags"])
    assert plan["builder_flags"] == (["VERSION_COMPATIBLE"] if settings.version_compatible else []) + (
        ["REFIT"] if settings.refittable else [])
    assert plan["hardware_compatibility_level"] == ("AMPERE_PLUS" if settings.hardware_compatible else None)
    assert plan["optimization_level"] == settings.optimization_level
    expected_pools = {k: v * 2**20 for k, v in (("WORKSPACE", settings.workspace_mb),
                                                ("TACTIC_DRAM", settings.tactic_memory_mb)) if v}
    assert plan["memory_pool_limits"] == expected_pools
    # one profile, derived from the engine spec: every input, min <= opt <= max, batch 1-2 for CFG
    (profile,) = plan["profiles"]
    assert set(profile) == set(dit_spec.input_names)
    for name, (lo, opt, hi) in profile.items():
        assert (lo, opt, hi) == tuple(list(s) for s in dit_spec.trt_profile()[name])
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert profile["hidden_states"][0][0] == 1 and profile["hidden_states"][2][0] == 2


def test_only_the_dit_is_built_refittable(tiny_engines):
    """--trt-refittable marks the plan the LoRAs go into (the first DiT), not the text encoder, VAE or probe."""
    m = load_manifest(tiny_engines("tiny-a"))
    flags = {n: builder_plan(m.spec(n), BuildSettings(refittable=True), "11.1.0")["builder_flags"]
             for n in m.engine_names}
    assert flags.pop("transformer") == ["REFIT"] and not any(flags.values())


def test_builder_plan_refusals(dit_spec):
    with pytest.raises(SoraError, match="takes 0 to 5"):
        builder_plan(dit_spec, BuildSettings(optimization_level=7), "11.0.0")
    with pytest.raises(SoraError, match="older than 10.3"):
        builder_plan(dit_spec, BuildSettings(), "8.6.1")


def test_timing_cache_is_per_gpu_model_and_version():
    h100 = {"compute_capability": "9.0", "name": "NVIDIA H100 80GB HBM3"}
    h200 = {"compute_capability": "9.0", "name": "NVIDIA H200"}
    assert timing_cache_name(h100, "10.14.1.48") == "timing-sm90-NVIDIA-H100-80GB-HBM3-trt10.14.cache"
    assert timing_cache_name(h100, "11.1.0") != timing_cache_name(h200, "11.1.0")  # one architecture, two GPUs
    assert timing_cache_name({"compute_capability": "8.7", "name": "Orin"}, "10.3.0") != \
        timing_cache_name(h100, "10.3.0")


def test_fp32_graphs_build_without_tf32(dit_spec):
    plan = builder_plan(dit_spec, BuildSettings(), "11.1.0")
    assert plan["cleared_flags"] == ["TF32"] and "TF32" not in plan["builder_flags"]


@pytest.mark.parametrize("attention, dit, hardware, arch, expect", [
    ("native", "fp32", True, (9, 0), None),
    ("plugin", "fp16", False, (9, 0), (9, 0)),
    ("plugin", "fp16", True, (8, 6), (8, 0)),  # PTX for sm_80 loads on every Ampere-or-newer GPU the plan targets
    ("plugin", "fp32", False, (9, 0), "strongly typed network, which cannot insert casts; this DiT is fp32"),
    ("int8", "int8", False, (8, 7), "this DiT is int8"),
    ("plugin", "fp16", True, (9, 0), "with --trt-hardware-compatible on sm_90"),
])
def test_plugin_builds_that_cannot_work_are_refused(attention, dit, hardware, arch, expect):
    settings = BuildSettings(hardware_compatible=hardware)
    if isinstance(expect, str):
        with pytest.raises(SoraError, match=re.escape(expect)):
            plugin_arch(attention, dit, settings, arch)
    else:
        assert plugin_arch(attention, dit, settings, arch) == expect


# -- the build record ----------------------------------------------------------------------------------------------
ORIN = {"backend": "tensorrt", "name": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0",
        "version_compatible": False, "hardware_compatible": False, "cuda_provider": False, "onnxruntime": "1.22.0",
        "cuda": None, "cudnn": None, "driver_cuda": "12.6"}


@pytest.mark.parametrize("record, here, expect", [
    ({}, {}, None),
    ({}, {"tensorrt": "10.3.1"}, "TensorRT here is 10.3.1, the plans were built with 10.3.0"),
    ({"version_compatible": True}, {"tensorrt": "10.7.0"}, None),  # later, same major: version-compatible plans
    ({"version_compatible": True}, {"tensorrt": "11.0.0"}, "TensorRT here is 11.0.0"),
    ({}, {"compute_capability": "9.0", "name": "H100"}, "this GPU is H100 (compute capability 9.0)"),
    ({"hardware_compatible": True}, {"compute_capability": "9.0"}, None),  # Ampere-plus plans
    ({"hardware_compatible": True}, {"compute_capability": "7.5"}, "compute capability 7.5"),
    ({}, {"tensorrt": None}, "TensorRT's Python package is not installed here"),
])
def test_tensorrt_build_record(record, here, expect):
    got = mismatches({**ORIN, **record}, {**ORIN, **here})
    assert got == [] if expect is None else (len(got) == 1 and expect in got[0]), got


# -- the attention plugin pass ---------------------------------------------------------------------------------------
def _attention_graph(heads: int, head_dim: int, blocks: int) -> onnx.ModelProto:
    """What the DiT export writes per attention: Transpose([B, L, H, D] -> [B, H, L, D]) x3 -> Attention ->
    Transpose back, here chained `blocks` times, with the shapes recorded as the exporter records them."""
    nodes, value_info = [], []
    x = "x"
    for i in range(blocks):
        for role in "qkv":
            nodes.append(helper.make_node("Transpose", [x], [f"{role}{i}"], perm=[0, 2, 1, 3], name=f"t_{role}{i}"))
        nodes.append(helper.make_node("Attention", [f"q{i}", f"k{i}", f"v{i}"], [f"a{i}"], name=f"attn{i}"))
        nodes.append(helper.make_node("Transpose", [f"a{i}"], [f"y{i}"], perm=[0, 2, 1, 3], name=f"t_out{i}"))
        value_info.append(helper.make_tensor_value_info(x, TensorProto.FLOAT16, ["b", "l", heads, head_dim]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "dit", [helper.make_tensor_value_info("x", TensorProto.FLOAT16,
                                                                            ["b", "l", heads, head_dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT16, ["b", "l", heads, head_dim])],
                              value_info=value_info[1:])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.mark.parametrize("mode, op", [("plugin", FLASH), ("int8", INT8)])
def test_every_attention_becomes_one_plugin_node(mode, op):
    model = _attention_graph(heads=2, head_dim=64, blocks=3)
    onnx.checker.check_model(model)
    report = to_plugin(model, mode)
    assert (report.attention_nodes, report.replaced) == (3, 3)
    ops = [n.op_type for n in model.graph.node]
    assert ops == [op] * 3  # the Transposes went with the Attention nodes
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == NAMESPACE and attrs == {"plugin_namespace": NAMESPACE.encode(), "plugin_version": b"1"}
        assert len(node.input) == 3 and len(node.output) == 1
    assert model.graph.node[-1].output[0] == model.graph.output[0].name  # the graph's output keeps its name
    assert any(op.domain == NAMESPACE for op in model.opset_import)
    onnx.checker.check_model(model)  # still a valid graph


def test_the_pass_matches_the_real_dit_export_and_refuses_its_head_dim(tiny_engines):
    model = onnx.load(str(load_manifest(tiny_engines("tiny-a")).engine_path("transformer")), load_external_data=False)
    total, matches = match_attention(model.graph)
    assert total == len(matches) == 4  # 2 blocks x (self + cross): every attention of the export fits
    with pytest.raises(SoraError, match=r"head dims \(64, 128\); this DiT's are \[12\]: use --attention native"):
        to_plugin(model)


# -- the plugin kernel, compiled ahead of time -------------------------------------------------------------------------
COMPILE = textwrap.dedent("""
    import json, sys
    from soraedge.fused_attention.trt_plugin import compile_attention
    plugin, dtype, head_dim, major, minor = sys.argv[1:]
    c = compile_attention(dtype, int(head_dim), 1, (int(major), int(minor)), plugin)
    print(json.dumps({"ptx": c.ptx.decode(), "threads": c.threads, "shared_mem": c.shared_mem,
                      "grid": c.grid(2, 4680, 12)}))
""")


@pytest.mark.parametrize("plugin, dtype, head_dim, arch", [(FLASH, "fp16", 128, (9, 0)), (FLASH, "bf16", 64, (8, 7)),
                                                           (INT8, "fp16", 128, (8, 7))])
def test_plugin_kernels_compile_to_ptx_with_the_plugin_calling_convention(plugin, dtype, head_dim, arch):
    pytest.importorskip("triton", reason="triton is not installed (the `kernels` extra)")
    from soraedge.fused_attention.trt_plugin import TILES

    # A fresh process: tests/test_kernels.py sets TRITON_INTERPRET=1 for this one, and interpreted kernels do not
    # compile to PTX.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE, plugin, dtype, str(head_dim), *map(str, arch)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    ptx = compiled["ptx"]
    assert f".target sm_{arch[0]}{arch[1]}" in ptx
    entry = ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))]
    params = re.findall(r"\.param \.(u64|u32)", entry)
    assert params == ["u64"] * 3 + ["u32"] * 3 + ["u64"]  # q, k, v; L, S, H; out: nothing hidden after it
    assert compiled["threads"] == TILES[1]["num_warps"] * 32 and compiled["shared_mem"] > 0
    assert compiled["grid"] == [-(-4680 // TILES[1]["BLOCK_M"]), 24]


class _PluginApi:
    """The classes `tensorrt.plugin` annotates with, as empty classes: what its validator checks is which class
    each annotation names, and TensorRT cannot be installed here."""

    class TensorDesc: ...

    class AutoTuneCombination: ...

    class KernelLaunchParams: ...

    class SymIntExprs: ...


@pytest.mark.parametrize("plugin", [FLASH, INT8])
def test_plugin_functions_pass_tensorrt_plugins_registration_checks(plugin):
    """TensorRT's `tensorrt.plugin` (_validate.py, 10.9 to 11.x) calls issubclass on every annotation at
    @register, requires `outputs: tuple[TensorDesc]` and `tactic: int`, and an aot_impl return annotation that is a
    4-tuple (str|bytes, str|bytes, KernelLaunchParams, SymIntExprs). String annotations (a module with
    `from __future__ import annotations`) fail all of these."""
    import inspect
    import typing

    api = _PluginApi
    desc, autotune, aot = plugin_functions(api, plugin)
    for fn, names in ((desc, ["q", "k", "v"]), (autotune, ["q", "k", "v", "outputs"]),
                      (aot, ["q", "k", "v", "outputs", "tactic"])):
        sig = inspect.signature(fn)
        assert list(sig.parameters) == names
        for name in ("q", "k", "v"):
            annotation = sig.parameters[name].annotation
            assert inspect.isclass(annotation) and issubclass(annotation, api.TensorDesc)
        if "outputs" in names:
            outputs = sig.parameters["outputs"].annotation
            assert typing.get_origin(outputs) is tuple and issubclass(typing.get_args(outputs)[0], api.TensorDesc)
    assert issubclass(inspect.signature(desc).return_annotation, api.TensorDesc)
    tuned = inspect.signature(autotune).return_annotation
    assert typing.get_origin(tuned) is list and issubclass(typing.get_args(tuned)[0], api.AutoTuneCombination)
    assert inspect.signature(aot).parameters["tactic"].annotation is int
    ret = inspect.signature(aot).return_annotation
    assert typing.get_origin(ret) is tuple and len(typing.get_args(ret)) == 4
    name, ptx, launch, scalars = typing.get_args(ret)
    assert name in (str, bytes) and ptx in (str, bytes)
    assert issubclass(launch, api.KernelLaunchParams) and issubclass(scalars, api.SymIntExprs)


def test_a_static_head_dim_is_read_as_the_expressions_constant():
    class AsProperty:
        is_constant, constant_value = True, 128

    class AsMethod:
        is_constant = True

        def constant_value(self):
            return 64

    class Dynamic:
        is_constant = False

    assert constant_value(AsProperty()) == 128 and constant_value(AsMethod()) == 64
    with pytest.raises(ValueError, match="static head dimension"):
        constant_value(Dynamic())


def test_hidden_parameters_are_stripped_only_when_unused():
    ptx = (".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1,\n\t.param .u64 k_param_2\n)\n{\n"
           "\tld.param.b64 %rd1, [k_param_0];\n}\n")
    out = strip_hidden_params(ptx, "k", keep=1)
    assert "k_param_1" not in out and "k_param_2" not in out and ".param .u64 k_param_0\n)" in out
    with pytest.raises(ValueError, match="reads its hidden parameter k_param_2"):
        strip_hidden_params(ptx.replace("[k_param_0]", "[k_param_2]"), "k", keep=1)


# -- on TensorRT ---------------------------------------------------------------------------------------------------
needs_tensorrt = pytest.mark.skipif(tensorrt_version() is None,
                                    reason="needs TensorRT and a GPU (TensorRT cannot be installed on this machine)")


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
@pytest.mark.parametrize("attention", ["native", "plugin", "int8"])
def test_tensorrt_plans_match_the_cpu_engines(tiny_engines, tmp_path, attention):
    from soraedge.target.build import TargetConfig, build_from_engines
    from soraedge.target.trt_target import TrtOptions
    from soraedge.runtime.pipeline import Pipeline

    if attention != "native":
        pytest.skip("the tiny DiT's head dim (12) is not one the plugin kernels take; covered at Wan size by bench")
    cpu = tiny_engines("tiny-a")
    trt_dir = tmp_path / "trt"
    build_from_engines(TargetConfig(cpu, trt_dir, "tensorrt", trt=TrtOptions(attention)))
    ref = Pipeline.load(cpu)("a red fox", steps=4, seed=3).frames
    for graph in (False, True):
        got = Pipeline.load(trt_dir, cuda_graph=graph)("a red fox", steps=4, seed=3).frames
        mse = float(np.mean((got - ref) ** 2))
        assert 10 * np.log10(1 / max(mse, 1e-20)) >= 40.0
