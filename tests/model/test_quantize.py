import copy
import shutil

import numpy as np
import pytest
import torch

from labkit.model import gguf
from labkit.model import quantize as quant
from labkit.engine.engine import Engine
from labkit.model.llama import from_hf
from labkit.model.loader import embedded_gguf_path
from labkit.model import gguf_linear
from labkit.model.gguf_linear import GGUFLinear
from labkit.model.quantize import (Int4WeightOnlyLinear, Int8WeightOnlyLinear, dequantize_int4_ref, quantize_int4_ref,
                                   quantize_int8_ref)

# the CPU kernels take bf16 activations and scales: their results carry bf16-sized errors
BF16_TOL = dict(atol=0.05, rtol=0.02)


def test_int8_reference_round_trip_error_is_bounded():
    w = torch.randn(64, 96)
    q, scale = quantize_int8_ref(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", quant.INT4_GROUP_SIZES)
def test_int4_reference_round_trip_error_is_half_a_step(group_size):
    w = torch.randn(48, 256) * torch.linspace(0.1, 3, 256)  # groups of very different ranges
    q, scale, minimum = quantize_int4_ref(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (48, 256 // group_size)
    err = (dequantize_int4_ref(q, scale, minimum) - w).abs().reshape(48, -1, group_size)
    assert (err <= scale[..., None] / 2 + 1e-5).all()


def test_int4_kernel_layout_is_what_unpack_reads():
    codes = torch.randint(0, 16, (128, 96), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(quant.unpack_int4pack(packed, 128, 96).int(), codes)


@pytest.mark.parametrize("group_size", quant.INT4_GROUP_SIZES)
@pytest.mark.parametrize("shape", [(40, 96), (1, 32), (131, 200)])  # outputs and inputs the kernel needs padded
def test_int4_linear_matches_its_dequantized_weight(shape, group_size):
    out_features, in_features = shape
    lin = torch.nn.Linear(in_features, out_features, bias=True)
    qlin = Int4WeightOnlyLinear.from_linear(lin, group_size)
    w = qlin.dequantize()
    assert w.shape == (out_features, in_features)
    step = (lin.weight.amax() - lin.weight.amin()) / 15
    assert (w - lin.weight).abs().max() <= step / 2 * 1.05  # half a code step (bf16 scales: 5 % slack)
    for rows in (1, 3, 70):  # decode rows and a prefill chunk, all through the packed kernel
        x = torch.randn(rows, in_features)
        torch.testing.assert_close(qlin(x), x @ w.t() + lin.bias, **BF16_TOL)
    torch.testing.assert_close(qlin._dense(x), qlin._matmul(x).float(), **BF16_TOL)


def test_int8_linear_matches_dequantized_reference():
    lin = torch.nn.Linear(96, 40, bias=True)
    qlin = Int8WeightOnlyLinear.from_linear(lin)
    q, scale = quantize_int8_ref(lin.weight)
    for rows in (5, quant.DENSE_MIN_ROWS):  # the packed kernel, then the dense GEMM of a long prefill chunk
        x = torch.randn(1, rows, 96)
        ref = x @ (q.float() * scale[:, None]).t() + lin.bias
        torch.testing.assert_close(qlin(x), ref, **BF16_TOL)


def _q8_0_blocks(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q8_0 rows as ggml lays them out, and their weights."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-128, 128, (rows, cols // 32, 32), generator=g).to(torch.int8)
    d = (torch.rand(rows, cols // 32, generator=g) * 0.01).half()
    blocks = torch.cat((d.view(torch.uint8).reshape(rows, -1, 2), q.view(torch.uint8)), dim=-1)
    return blocks.reshape(rows, -1), (q.float() * d.float()[..., None]).reshape(rows, cols)


def _q4_1_parts(rows: int, cols: int):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (rows, cols), generator=g).to(torch.uint8)
    d = (torch.rand(rows, cols // 32, generator=g) * 0.01).half().float()
    m = (-torch.rand(rows, cols // 32, generator=g) * 0.05).half().float()
    return codes, d, m


def test_gguf_linears_keep_the_files_codes_and_scales():
    blocks, w = _q8_0_blocks(64, 96)
    torch.testing.assert_close(quant.dequantize_q8_0(blocks), w, atol=0, rtol=0)
    head = GGUFLinear.from_q8_0(blocks)
    assert torch.equal(head.dequantize(), w)  # codes and float16 scales exactly as the file holds them
    codes, d, m = _q4_1_parts(40, 96)
    lin = GGUFLinear.from_q4_1(codes, d, m)
    assert torch.equal(lin.codes(), codes)
    assert torch.equal(lin.dequantize(), dequantize_int4_ref(codes, d, m))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_kernel_matches_its_torch_reference_and_gives_each_row_its_own_bits(bits, dtype):
    """The C++ kernel (csrc/gguf_linear.cpp) against `gguf_matmul_ref` (the same integer sums, in torch), and
    every row of a many-row call bit-identical to that row alone (what makes speculation and chunked prefill
    lossless). 18 blocks: a ragged last chunk of 16; 7 outputs: a ragged last tile of 4; 9 rows: tiles of 2 and 1."""
    if not gguf_linear.gguf_linear_available():
        pytest.skip("the CPU kernels extension is not built here")
    rows, cols = 7, 576
    if bits == 8:
        blocks, w = _q8_0_blocks(rows, cols)
        lin = GGUFLinear.from_q8_0(blocks)
    else:
        codes, d, m = _q4_1_parts(rows, cols)
        lin = GGUFLinear.from_q4_1(codes, d, m)
        w = lin.dequantize()
    x = (torch.randn(9, cols, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 4, cols)).to(dtype)
    y = lin(x)
    assert y.dtype == dtype
    ref = gguf_linear.gguf_matmul_ref(x.float(), lin.packed, lin.d, lin.m, bits)
    # the same sums in another order, rounded to the output dtype; where an activation lands within an ulp of a
    # rounding midpoint (bf16 inputs have few bits, so some do) its int8 code may differ by one: one code of one
    # block, d * dx * (largest code), bounds that
    one_code = lin.d.float().abs().max() * (255 if bits == 8 else 15) * x.float().abs().max() / 127
    close = torch.isclose(y.float(), ref, atol=1e-4, rtol=1e-5 if dtype == torch.float32 else 2**-8)
    assert close.float().mean() > 0.9 and ((y.float() - ref).abs() <= one_code).all()
    # int8 activations per block of 32, as llama.cpp: close to the dense product, not equal
    dense = x.float() @ w.t()
    assert ((y.float() - dense).norm() / dense.norm()) < 0.02
    assert torch.equal(torch.cat([lin(x[i:i + 1]) for i in range(9)]), y)
    assert torch.equal(torch.compile(lin, fullgraph=True)(x), y)  # the custom op, whole inside a graph


@pytest.fixture(scope="module")
def gguf_tensors():
    return gguf.read_gguf_tensors(embedded_gguf_path())


def test_gguf_blocks_dequantize_exactly_as_the_gguf_package(gguf_tensors):
    from gguf.quants import dequantize

    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"):
        t = gguf_tensors[name]
        rows = np.ascontiguousarray(t.data[:40])
        ref = torch.from_numpy(dequantize(rows, t.tensor_type).astype(np.float32))
        ours = (quant.dequantize_q4_1 if t.tensor_type.name == "Q4_1" else quant.dequantize_q8_0)(
            torch.from_numpy(rows.copy()))
        assert torch.equal(ours, ref), name


@pytest.fixture(scope="module")
def gguf_model(embedded):
    return quant.quantize(from_hf(embedded.model), "gguf")


def test_gguf_scheme_loads_the_files_codes_unchanged(embedded, gguf_model, gguf_tensors):
    fp32 = from_hf(embedded.model)  # transformers dequantized the same file: it is the reference
    layer = gguf_model.layers[3]
    codes, _, _ = gguf.unpack_q4_1(gguf.gguf_rows(gguf_tensors["blk.3.ffn_down.weight"], (576, 1536)))
    assert torch.equal(layer.mlp.w_down.codes()[:576, :1536], codes)
    for mine, ref in [(layer.attn.wqkv, fp32.layers[3].attn.wqkv), (layer.mlp.w_gate_up, fp32.layers[3].mlp.w_gate_up),
                      (gguf_model.lm_head, fp32.lm_head)]:
        w = ref.weight.t() if ref.kn else ref.weight
        # q and k rows come back from llama.cpp's RoPE permutation (a wrong row order would be ~100 % off):
        # the file's blocks, dequantized, are exactly what transformers dequantized
        assert torch.equal(mine.dequantize(), w)
    assert gguf_model.rewrites[-1] == "quant:gguf"


def test_a_saved_gguf_model_loads_back_the_same_blocks(embedded, gguf_model, tmp_path):
    ids = embedded.tokenizer.encode("The three primary colors are red, yellow and")
    again = quant.load_quantized(quant.save_quantized(gguf_model, tmp_path / "gguf.pt"))
    assert isinstance(again.lm_head, GGUFLinear) and again.lm_head.bits == 8 and again.layers[0].mlp.w_down.bits == 4
    assert torch.equal(Engine(again, embedded.tokenizer).prompt_logits(ids),
                       Engine(gguf_model, embedded.tokenizer).prompt_logits(ids))


def test_quantized_engines_keep_the_embedded_model_close(embedded, gguf_model):
    fp32 = Engine.from_hf(embedded.model, embedded.tokenizer)
    ids = fp32.encode("The three primary colors are red, yellow and")
    ref = fp32.prompt_logits(ids)
    # gguf's weights are the fp32 model's exactly; what moves its logits is the int8 activations (llama.cpp's q8_1)
    for scheme, engine, min_cos in [("int8", Engine.from_hf(embedded.model, embedded.tokenizer, quantize="int8"), 0.98),
                                    ("gguf", Engine(gguf_model, embedded.tokenizer), 0.995)]:
        assert engine.describe()["quantize"] == scheme
        logits = engine.prompt_logits(ids)
        assert torch.nn.functional.cosine_similarity(ref, logits, dim=-1).min() > min_cos, scheme
        assert (ref.argmax(-1) == logits.argmax(-1)).float().mean() > 0.8, scheme


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_gguf_kernel_without_vnni_computes_the_same_sums(tmp_path):
    """The plain-loop path of csrc/gguf_linear.cpp (CPUs without AVX512-VNNI: AVX2 only, or AVX-512 without it),
    built here for x86-64-v3 (AVX2, which every x86 machine of the lab has), against the torch reference: 4-bit
    codes in full runs of four blocks and a tail (18 blocks), 8-bit codes, and a width of three blocks only."""
    from torch.utils.cpp_extension import load

    from labkit.model.cpu_attention import CSRC

    for name in ("gguf_linear.cpp", "vec.h"):
        shutil.copyfile(CSRC / name, tmp_path / name)
    (tmp_path / "bind.cpp").write_text(
        "#include <torch/extension.h>\n"
        "torch::Tensor gguf_linear(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t);\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def(\"gguf_linear\", &gguf_linear); }\n")
    ext = load(name="labkit_gguf_plain", sources=[str(tmp_path / "gguf_linear.cpp"), str(tmp_path / "bind.cpp")],
               build_directory=str(tmp_path), extra_cflags=["-O3", "-march=x86-64-v3", "-fopenmp", "-ffast-math"],
               extra_ldflags=["-fopenmp"])
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(4))
    codes, d, m = _q4_1_parts(6, 576)
    blocks, _ = _q8_0_blocks(6, 576)
    for lin in (GGUFLinear.from_q4_1(codes, d, m), GGUFLinear.from_q8_0(blocks),
                GGUFLinear.from_q4_1(codes[:, :96], d[:, :3], m[:, :3])):
        xs = x[:, : lin.in_features]
        y = ext.gguf_linear(xs, lin.packed, lin.d, lin.m, lin.bits)
        torch.testing.assert_close(y, gguf_linear.gguf_matmul_ref(xs, lin.packed, lin.d, lin.m, lin.bits), atol=1e-4,
                                   rtol=1e-5)
        assert torch.equal(torch.cat([ext.gguf_linear(xs[i:i + 1], lin.packed, lin.d, lin.m, lin.bits)
                                      for i in range(5)]), y)


@pytest.mark.parametrize("compile", [False, True])
def test_gguf_with_prompt_lookup_is_token_identical_on_the_real_model(embedded, compile, monkeypatch):
    """The real model's near-ties, where a last-bit difference between a row alone and a row beside draft tokens
    flips a greedy token: gguf linears with n-gram speculation, two requests batched, bf16 activations (the serving
    default on an AVX512-BF16 CPU; the C++ attention), emit exactly what the same gguf model emits without it,
    eagerly. Compiled: the decode steps without drafts run compiled (the kernels as operators inside the graph),
    the others eagerly, and the tokens are still the eager plain model's."""
    from labkit.engine.config import SpeculativeConfig
    from labkit.model.sampling import SamplingParams
    from labkit.speculative.bench import WORKLOADS, encode

    # a chat prompt and a copy task: a compiled step attending with another kernel than the eager steps flips
    # their tokens early (measured: at batch 1, tokens 2 and 5)
    prompts = [encode(embedded.tokenizer, WORKLOADS[w][0]) for w in ("chat", "copy")]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, detokenize=False)
    kwargs = dict(dtype="bf16", quantize="gguf", enable_prefix_caching=False)
    plain = Engine.from_hf(embedded.model, embedded.tokenizer, **kwargs)
    spec = Engine.from_hf(embedded.model, embedded.tokenizer, speculative=SpeculativeConfig(8, prompt_lookup_max=4),
                          compile=compile, **kwargs)
    static = []
    if compile:
        assert spec.warmup() > 0  # the compiled decode step, traced before the requests
        forward_static = spec.runner.forward_static
        monkeypatch.setattr(spec.runner, "forward_static", lambda spans: static.append(1) or forward_static(spans))
    want = [g.tokens for g in plain.generate(prompts, params)]
    got = [g.tokens for g in spec.generate(prompts, params)]
    assert spec.speculator.stats.num_accepted_tokens > 10  # drafts were verified in batches, and kept
    assert bool(static) == compile  # compiled: some steps (those without drafts) ran the compiled step
    assert got == want


@pytest.mark.parametrize("method", [m for m in quant.QUANT_METHODS if m != "gguf"])
def test_quantized_tiny_model_logits_stay_close_and_survive_save_and_load(tiny, method, tmp_path):
    ids = torch.arange(1, 40) * 7
    ref = Engine(from_hf(tiny.model), tiny.tokenizer).prompt_logits(ids.tolist())
    model = quant.quantize(from_hf(tiny.model), method)
    logits = Engine(model, tiny.tokenizer).prompt_logits(ids.tolist())
    assert torch.nn.functional.cosine_similarity(ref, logits, dim=-1).min() > 0.97
    path = quant.save_quantized(model, tmp_path / "model.pt")
    again = quant.load_quantized(path)
    assert again.rewrites == model.rewrites
    assert torch.equal(Engine(again, tiny.tokenizer).prompt_logits(ids.tolist()), logits)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_quantization_requests_are_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quant.quantize(from_hf(tiny.model), "int3")
    model = quant.quantize(from_hf(tiny.model), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(model, "int4-g32")
    with pytest.raises(ValueError, match="not quantized"):
        quant.save_quantized(from_hf(tiny.model), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="group_size 16"):
        Int4WeightOnlyLinear(64, 64, 16)
    # the tiny model is not the GGUF file's model: a clear error, not a silent mismatch
    with pytest.raises(ValueError, match="shape"):
        quant.quantize(from_hf(tiny.model), "gguf")


@pytest.mark.gpu
@pytest.mark.parametrize("method", quant.BNB_METHODS)
def test_bitsandbytes_linears_keep_a_tiny_model_close_on_cuda(tiny, method):
    pytest.importorskip("bitsandbytes")
    ids = (torch.arange(1, 40) * 7).tolist()
    hf = copy.deepcopy(tiny.model).to("cuda")  # the session's tiny model stays on the CPU
    ref = Engine(from_hf(hf), tiny.tokenizer).prompt_logits(ids)
    quantized = quant.quantize(from_hf(hf), method)
    assert any(isinstance(m, quant.BnbLinear) for m in quantized.modules())
    logits = Engine(quantized, tiny.tokenizer).prompt_logits(ids)
    assert torch.nn.functional.cosine_similarity(ref.float(), logits.float(), dim=-1).min() > 0.95


def test_bitsandbytes_is_refused_off_cuda(tiny):
    with pytest.raises(ValueError, match="bitsandbytes' CUDA kernels"):
        quant.quantize(from_hf(tiny.model), "bnb-nf4")
