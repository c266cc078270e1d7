"""The CPU paged-attention extension (labkit.model.cpu_attention): equal to a float64 reference over the same
blocks, for bfloat16 and float32 caches, grouped heads, contexts that end inside a block, and a head size off the
vectorized path; the model's attention uses it for every token of a step over a bfloat16 KVCache (decode rows,
fresh prompts and prompt chunks after cached tokens), a prompt's outputs do not depend on its chunking, and a
token in a run of a prompt's tokens gets the bits it gets alone."""

import random
import shutil

import pytest
import torch

from labkit.model import cpu_attention
from labkit.model.attention import build_metadata, paged_attention, sdpa_core
from labkit.model.kv_cache import KVCache, write_kv

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler to build the extension")


def _reference(q, k_heads, v_heads, tables, lens, block_size, scale):
    out = torch.empty_like(q, dtype=torch.float64)
    H, Hkv = q.shape[1], k_heads.shape[0]
    for b, n in enumerate(lens.tolist()):
        slots = torch.tensor([tables[b, t // block_size].item() * block_size + t % block_size for t in range(n)])
        keys = k_heads[:, slots].double().repeat_interleave(H // Hkv, dim=0)  # [H, n, D]
        values = v_heads[:, slots].double().repeat_interleave(H // Hkv, dim=0)
        p = torch.softmax((keys @ q[b].double()[:, :, None])[..., 0] * scale, dim=-1)  # [H, n]
        out[b] = (p[:, :, None] * values).sum(1)
    return out


@pytest.mark.parametrize("dtype, H, Hkv, D", [
    (torch.bfloat16, 9, 3, 64), (torch.float32, 9, 3, 64),  # the specialised path (groups of 1-8, D 64 or 128)
    (torch.bfloat16, 32, 4, 128), (torch.bfloat16, 4, 4, 128), (torch.float32, 16, 2, 128),
    (torch.float32, 4, 4, 32), (torch.bfloat16, 6, 2, 24), (torch.bfloat16, 18, 2, 64)])  # the general path
def test_paged_decode_equals_a_float64_reference(dtype, H, Hkv, D):
    op = cpu_attention.paged_decode_op()
    assert op is not None, "the extension did not build"
    rng = random.Random(0)
    bs, num_blocks, B = 4, 40, 5
    k = torch.randn(Hkv, num_blocks * bs, D).to(dtype)
    v = torch.randn(Hkv, num_blocks * bs, D).to(dtype)
    lens = torch.tensor([1, 4, 5, 13, 17])  # one key, whole blocks, and contexts ending inside a block
    blocks = rng.sample(range(num_blocks), 5 * B)
    tables = torch.tensor([blocks[5 * b:5 * b + 5] for b in range(B)])
    q = torch.randn(B, H, D).to(dtype)
    got = op(q, k, v, tables, lens, bs, D**-0.5)
    want = _reference(q, k, v, tables, lens, bs, D**-0.5)
    assert got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_the_model_attention_reads_a_bf16_cache_through_it(monkeypatch):
    calls = []
    op = cpu_attention.paged_decode_op()
    monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: lambda *a: calls.append(1) or op(*a))
    bs, H, Hkv, D = 4, 6, 2, 32
    cache = KVCache(1, 12, bs, Hkv, D, "cpu", torch.bfloat16)
    contexts = [7, 9, 12]
    tables = [[0, 1], [2, 3, 4], [5, 6, 7]]
    history = {b: (torch.randn(n, Hkv, D).bfloat16(), torch.randn(n, Hkv, D).bfloat16())
               for b, n in enumerate(contexts)}
    for b, (k, v) in history.items():  # every row's whole context, as earlier steps would have written it
        slots = torch.tensor([tables[b][t // bs] * bs + t % bs for t in range(contexts[b])])
        write_kv(cache.k[0], cache.v[0], k, v, slots)
    last = [tables[b][(n - 1) // bs] * bs + (n - 1) % bs for b, n in enumerate(contexts)]
    meta = build_metadata([1, 1, 1], contexts, tables, last, bs, "cpu")
    q = torch.randn(3, H, D).bfloat16()
    k_new = torch.stack([history[b][0][-1] for b in range(3)])
    got = paged_attention(q, k_new, k_new, cache.k[0], cache.v[0], meta, D**-0.5, sdpa_core)
    assert calls, "the extension was not used"
    for b, n in enumerate(contexts):  # each row against dense attention over its own history
        keys = history[b][0].float().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        values = history[b][1].float().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
        p = torch.softmax((keys @ q[b].float()[:, :, None])[..., 0] * D**-0.5, dim=-1)
        torch.testing.assert_close(got[b].float(), (p[:, :, None] * values).sum(1), atol=2e-2, rtol=2e-2)


def _step(cache, bs, H, Hkv, D, tables, spans, history):
    """q and the attention output of one step whose row b computes tokens spans[b] = (start, end) of its history,
    after writing their keys and values as the model does."""
    query_lens = [end - start for start, end in spans]
    slots = [tables[b][t // bs] * bs + t % bs for b, (start, end) in enumerate(spans) for t in range(start, end)]
    k = torch.cat([history[b][0][start:end] for b, (start, end) in enumerate(spans)])
    v = torch.cat([history[b][1][start:end] for b, (start, end) in enumerate(spans)])
    write_kv(cache.k[0], cache.v[0], k, v, torch.tensor(slots))
    meta = build_metadata(query_lens, [end for _, end in spans], tables, slots, bs, "cpu")
    q = torch.cat([history[b][2][start:end] for b, (start, end) in enumerate(spans)])
    return q, paged_attention(q, k, v, cache.k[0], cache.v[0], meta, D**-0.5, sdpa_core)


def _histories(lengths, Hkv, H, D):
    gen = torch.Generator().manual_seed(1)
    return {b: tuple(torch.randn(n, h, D, generator=gen).bfloat16() for h in (Hkv, Hkv, H))
            for b, n in enumerate(lengths)}


def test_prompt_tokens_decode_rows_and_chunks_attend_causally_in_one_call(monkeypatch):
    """One step with a fresh prompt, a decode row and a prompt chunk after 12 cached tokens: one kernel call, and
    every token equal to dense attention over the keys up to its own position."""
    calls = []
    op = cpu_attention.paged_decode_op()
    monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: lambda *a: calls.append(1) or op(*a))
    bs, H, Hkv, D = 4, 6, 2, 64
    cache = KVCache(1, 16, bs, Hkv, D, "cpu", torch.bfloat16)
    tables = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    history = _histories([13, 9, 17], Hkv, H, D)
    for b, n in ((1, 8), (2, 12)):  # what earlier steps cached
        _step(cache, bs, H, Hkv, D, [tables[b]], [(0, n)], {0: history[b]})
    calls.clear()
    spans = [(0, 13), (8, 9), (12, 17)]
    q, got = _step(cache, bs, H, Hkv, D, tables, spans, history)
    assert len(calls) == 1, "one call for the whole step"
    i = 0
    for b, (start, end) in enumerate(spans):
        for p in range(start, end):
            keys = history[b][0][:p + 1].double().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)  # [H, p+1, D]
            values = history[b][1][:p + 1].double().transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
            w = torch.softmax((keys @ q[i].double()[:, :, None])[..., 0] * D**-0.5, dim=-1)
            torch.testing.assert_close(got[i].double(), (w[:, :, None] * values).sum(1), atol=1e-2, rtol=1e-2)
            i += 1


def test_a_prompts_outputs_do_not_depend_on_its_chunking():
    """Each token reads its own context the same way whatever else the step holds: one 40-token step, or chunks
    of 24 and 16 (chunked prefill, or a prefix-cache hit), give the same bits."""
    bs, H, Hkv, D = 16, 9, 3, 64
    history = _histories([40], Hkv, H, D)
    whole = _step(KVCache(1, 4, bs, Hkv, D, "cpu", torch.bfloat16), bs, H, Hkv, D, [[0, 1, 2]], [(0, 40)], history)[1]
    cache = KVCache(1, 4, bs, Hkv, D, "cpu", torch.bfloat16)
    first = _step(cache, bs, H, Hkv, D, [[0, 1]], [(0, 24)], history)[1]
    second = _step(cache, bs, H, Hkv, D, [[0, 1, 2]], [(24, 40)], history)[1]
    assert torch.equal(whole, torch.cat([first, second]))


@pytest.mark.parametrize("H, Hkv, D", [(9, 3, 64), (32, 4, 128), (4, 4, 128)])
def test_a_token_in_a_run_gets_the_bits_it_gets_alone(H, Hkv, D):
    """A prompt's consecutive tokens go through the kernel in runs (each tile of 16 keys read and transposed once
    for up to 16 tokens); each token's output is bit for bit what it is as a row of its own (a decode row)."""
    op = cpu_attention.paged_decode_op()
    torch.manual_seed(0)
    bs, num_blocks = 16, 12
    k = torch.randn(Hkv, num_blocks * bs, D).bfloat16()
    v = torch.randn(Hkv, num_blocks * bs, D).bfloat16()
    tables = torch.tensor([[5, 2, 9, 0, 7], [1, 3, 4, 6, 8]])
    # a 37-token prompt (runs of 16, 16 and 5 tokens), then 3 tokens after 50 cached ones (keys ending mid-tile)
    lens = torch.cat([torch.arange(1, 38), torch.arange(51, 54)])
    rows = torch.tensor([0] * 37 + [1] * 3)
    q = torch.randn(len(lens), H, D).bfloat16()
    in_runs = op(q, k, v, tables, lens, bs, D**-0.5, rows)
    alone = op(q, k, v, tables[rows], lens, bs, D**-0.5)  # a block table row per token: no runs
    assert torch.equal(in_runs, alone)
    want = _reference(q, k, v, tables[rows], lens, bs, D**-0.5)
    torch.testing.assert_close(in_runs.double(), want, atol=1e-2, rtol=1e-2)


def test_bad_token_rows_and_contexts_are_refused():
    op = cpu_attention.paged_decode_op()
    k = torch.zeros(2, 16, 64, dtype=torch.bfloat16)
    q = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    tables = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match="token row 2 is not a table row"):
        op(q, k, k, tables, torch.tensor([1, 2, 3]), 4, 0.125, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="context length 9 does not fit"):
        op(q, k, k, tables, torch.tensor([1, 9, 3]), 4, 0.125, torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="one block table per query token"):
        op(q, k, k, tables, torch.tensor([1, 2, 3]), 4, 0.125)


_BUILD_IN_A_CHILD = """
from labkit.model import cpu_attention
print(cpu_attention.paged_decode_op() is not None, cpu_attention.build_directory())
"""


def _child(env, timeout=600):
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BUILD_IN_A_CHILD], env={**os.environ, **env}, timeout=timeout,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", out[1]


def test_a_builder_that_died_holding_torchs_lock_does_not_block_the_next_build(tmp_path, monkeypatch):
    """torch waits forever on a lock file its dead owner left; the extension's own flock dies with its holder, so a
    new process builds, and the process after it imports the build without building again."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = cpu_attention.build_directory()
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # a builder killed before it wrote the library, holding torch's lock
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    assert _child(env, timeout=600) == (True, str(directory))
    assert list(directory.glob("*.so"))
    assert _child({**env, "PATH": ""}, timeout=120) == (True, str(directory))  # no compiler, no ninja: imported


def test_checkouts_at_different_paths_share_one_build(tmp_path, monkeypatch):
    """The build folder is named by what is built (sources, flags, torch, Python, CPU), not by where they are."""
    here = cpu_attention.build_directory()
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_attention.CSRC, copy)
    monkeypatch.setattr(cpu_attention, "CSRC", copy)
    assert cpu_attention.build_directory() == here
    (copy / "vec.h").write_text((copy / "vec.h").read_text() + "\n// changed\n")
    assert cpu_attention.build_directory() != here  # a changed file is built anew
