"""--quantization fp8 on a GPU with compute capability >= 8.9 (skipped elsewhere): the fp8 linear
layer tracks bf16, and the engine generates with it, CUDA graphs included."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with compute capability >= 8.9", allow_module_level=True)

from engine_core.layers.fp8_linear import Fp8Linear
from engine_core.layers.linear import Linear
from engine_core.llm import LLM
from engine_core.sampling_params import SamplingParams

CONFIG = "benchmarks/configs/smollm2-135m-instruct.json"


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_fp8_linear_tracks_bf16(rows):
    torch.manual_seed(0)
    with torch.device("cuda"):
        lin = Linear(4096, 1024, bias=True).to(torch.bfloat16)
        lin.weight.data.normal_(std=0.02)
        lin.bias.data.normal_()
        x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    ref = lin(x).float()
    got = Fp8Linear(lin, torch.bfloat16)(x).float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.06


def test_engine_generates_with_fp8_and_cuda_graphs():
    prompts = [[100 + i for i in range(32)], [500 + i for i in range(20)]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = {}
    for q in (None, "fp8"):
        llm = LLM(model=f"dummy:{CONFIG}", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
                  quantization=q, gpu_memory_utilization=0.2)
        outs[q] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.engine.core.executor.runner.graph_runner is not None
        del llm
    assert all(len(t) == 16 for t in outs["fp8"])


@pytest.mark.parametrize("shape", [(1, 4096), (5, 14336), (300, 576)])
def test_triton_per_token_quant_matches_torch_twin(shape):
    from engine_core.kernels.fp8_quant import per_token_quant_fp8
    from engine_core.layers.fp8_linear import quantize_fp8_per_token

    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 3
    q, s = per_token_quant_fp8(x)
    q_ref, s_ref = quantize_fp8_per_token(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    same = (q.float() == q_ref.float()).float().mean().item()
    assert same > 0.999, same  # x / scale may round differently by one ulp in rare elements


@pytest.mark.parametrize("rows", [1, 2, 8, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 576)])
def test_weight_only_kernel_matches_torch_twin(rows, n, k):
    """The decode path (engine_core/kernels/fp8_gemv.py) at real shapes, split-K included."""
    from engine_core.kernels.fp8_gemv import fp8_w8a16
    from engine_core.layers.fp8_linear import (
        fp8_weight_only_ref,
        quantize_fp8_per_channel,
    )

    torch.manual_seed(rows)
    q, s = quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for b in (None, bias):
        got, ref = fp8_w8a16(x, q, s, b).float(), fp8_weight_only_ref(x, q, s, b).float()
        assert ((got - ref).norm() / ref.norm()).item() < 5e-3


def test_fp8_weights_are_half_of_bf16_and_one_row_matches():
    """The gate_up shape of an 8B model at one row (the bs1 decode case the kernel exists for)."""
    from engine_core.kernels.fp8_gemv import fp8_w8a16
    from engine_core.layers.fp8_linear import quantize_fp8_per_channel

    w = torch.randn(28672, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = quantize_fp8_per_channel(w)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert q.untyped_storage().nbytes() * 2 == w.untyped_storage().nbytes()
    torch.testing.assert_close(fp8_w8a16(x, q, s, None).float(), (x.float() @ (q.float() * s[:, None]).t()),
                               rtol=2e-2, atol=2e-2)


def test_gptq_fp8_checkpoint_of_embedded_model_serves_on_cuda(tmp_path):
    """The offline tool (GPTQ on CUDA) writes a checkpoint of the embedded SmolLM2 that loads on
    CUDA as stored (Fp8Linear codes = the checkpoint's), keeps its perplexity near bf16's on the
    prefill (w8a8) path, and generates through the engine with CUDA graphs (weight-only decode)."""
    from safetensors import safe_open

    from engine_core.loader import load_model
    from engine_core.loader.model_source import embedded_gguf_path
    from engine_core.perplexity import perplexity
    from engine_core.tokenizer import load_tokenizer
    from engine_core.tools.quantize_fp8 import quantize_fp8

    try:
        gguf = embedded_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ckpt = str(tmp_path / "fp8")
    quantize_fp8(gguf, ckpt, device="cuda")

    model = load_model(ckpt, "bfloat16", "cuda", quantization="fp8")
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, Fp8Linear)
    with safe_open(f"{ckpt}/model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(layer.qweight_t.t().cpu().view(torch.uint8), stored.view(torch.uint8))

    with open("tests/data/perplexity_text.txt", encoding="utf-8") as f:
        ids = load_tokenizer(gguf).encode(f.read())
    fp8 = perplexity(model, ids, "cuda")
    del model
    bf16 = perplexity(load_model(gguf, "bfloat16", "cuda"), ids, "cuda")
    assert fp8 / bf16 - 1 < 0.03, (fp8, bf16)

    llm = LLM(model=ckpt, dtype="bfloat16", max_model_len=256, max_num_seqs=4, quantization="fp8",
              gpu_memory_utilization=0.2)
    out = llm.generate(["The capital of France is", "def fibonacci(n):"],
                       SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert llm.engine.core.executor.runner.graph_runner is not None
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)
    assert all(o.outputs[0].text.strip() for o in out)
