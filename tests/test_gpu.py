"""The CUDA path (--device cuda): calibration statistics, rankings and verification on the GPU
agree with the CPU. Skipped where no CUDA device is present (CI has none); run with
`pytest -m gpu` on a machine with one."""

import pytest
import torch

import planted
from helpers import logits, tokens
from planted import rel_err
from test_calibrate import CALIB, act_stages
from test_planted import LLAMA_TARGET, check_kept

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def _stats(path, device):
    from shrinkit.calibrate import calibrate
    from shrinkit.checkpoint.reader import open_checkpoint
    from shrinkit.pipeline import prepare
    from shrinkit.recipe import Calibration
    from helpers import recipe

    spec = Calibration(data="random_tokens", samples=8, seq_len=32, batch_size=4)
    with open_checkpoint(path) as ck:
        return calibrate(ck, prepare(ck, recipe()), spec, seed=0, device=device)


def close(a, b) -> bool:
    a = a.detach().cpu().double()
    b = b.double()
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-12


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_cuda_statistics_equal_cpu(tmp_path, kind):
    pl = {"llama": planted.llama_like, "gpt2": planted.gpt2, "bert": lambda p: planted.bert(p, mlm=False)}[kind](tmp_path / "p")
    cpu, gpu = _stats(pl.path, "cpu"), _stats(pl.path, "cuda")
    assert gpu.tokens == cpu.tokens
    assert gpu.scores.keys() == cpu.scores.keys()
    for k in cpu.scores:  # hidden, every layer's ffn neurons and heads
        assert close(gpu.scores[k], cpu.scores[k]), k
    assert max(abs(a - b) for a, b in zip(gpu.influence, cpu.influence)) < 1e-4


def test_cuda_subclone_planted_exact_and_verified(tmp_path):
    from shrinkit.pipeline import subclone
    from helpers import recipe

    pl = planted.llama_like(tmp_path / "parent", "llama")
    rec = recipe(target=LLAMA_TARGET, stages=act_stages(),
                 verify={"data": "random_tokens", "samples": 8, "seq_len": 32, "batch_size": 4})
    res = subclone(pl.path, rec, tmp_path / "child", device="cuda", verify=True)
    check_kept(res.report, pl, n_hidden=64, n_ffn=96, nq=4, nkv=2)
    ids = tokens(96)
    assert rel_err(logits(tmp_path / "child", ids), logits(pl.path, ids)) < 1e-4
    v = res.report["verify"]
    assert v["child"]["kl"] < 1e-5, v
    assert v["random_init"]["kl"] > 1e-2, v


@pytest.mark.parametrize("stage", ["heal", "rotate_hidden"])
@pytest.mark.parametrize("overflow", [False, True])
def test_cuda_heal_rotate_verify_equal_cpu(tmp_path, monkeypatch, stage, overflow):
    """heal or rotate_hidden and the full verification on the GPU, with the default budget (streams
    resident, blocks cast once) and with a budget that holds nothing (every stream overflows to the
    scratch file, weights cast a few rows at a time): the child and the verification numbers equal
    the CPU's."""
    from safetensors.torch import load_file

    from shrinkit import api
    from shrinkit.runtime import Budget

    pl = planted.llama_like(tmp_path / "p")
    rec = {"target": {"hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3},
           "calibration": {"data": "random_tokens", "samples": 8, "seq_len": 16, "batch_size": 4},
           "verify": {"data": "random_tokens", "samples": 4, "seq_len": 16},
           "stages": [{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"drop": [2]}}, {stage: {}},
                      {"slice_embeddings": {}}]}
    cpu = api.subclone(pl.path, rec, tmp_path / "cpu")
    if overflow:
        monkeypatch.setattr(Budget, "resident", lambda self, n: False)
        monkeypatch.setattr(Budget, "cast_block", lambda self, n: False)
    gpu = api.subclone(pl.path, rec, tmp_path / "gpu", device="cuda")
    assert gpu.report["runtime"]["device_memory"] > 0
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    for k in a:
        assert close(b[k], a[k]), k
    for who in ("parent", "child"):
        assert gpu.report["verify"][who]["loss"] == pytest.approx(cpu.report["verify"][who]["loss"], rel=1e-4)
