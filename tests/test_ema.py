"""EMA: the warm-up of its decay and the average itself."""

from __future__ import annotations

import pytest
import torch

from training.ema import EMA


def test_decay_warms_up_then_holds():
    ema = EMA(torch.nn.Linear(2, 2), decay=0.99, warmup=10)
    decays = []
    for _ in range(2000):
        decays.append(ema.current_decay())
        ema.updates += 1
    assert decays[0] == pytest.approx(0.1) and decays[1] == pytest.approx(2 / 11)
    assert max(decays) == 0.99 and decays[-1] == 0.99 and decays == sorted(decays)


def test_average_follows_the_weights():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5, warmup=1)  # decay min(0.5, (1+n)/(1+n)) = 0.5 from the start
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 3), 0.75))
    restored = EMA(model, 0.5, 1)
    restored.load_state_dict(ema.state_dict(), ema.updates)
    assert restored.updates == 2 and torch.equal(restored.state_dict()["weight"], ema.state_dict()["weight"])
    with pytest.raises(KeyError, match="the EMA state lacks 'weight'"):
        restored.load_state_dict({}, 0)


def test_a_saved_average_loads_from_its_file_and_names_the_file_when_it_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    saved = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    save_file(saved, str(tmp_path / "ema.safetensors"))
    ema = EMA(model, 0.9)
    ema.load_file(str(tmp_path / "ema.safetensors"), 7)
    assert ema.updates == 7 and all(torch.equal(ema.state_dict()[n], saved[n]) for n in saved)
    save_file({**saved, "1.weight": torch.zeros(2, 5)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        ValueError, match=r"wide.safetensors': '1.weight' has shape \(2, 5\), the network's is \(2, 4\)"
    ):
        ema.load_file(str(tmp_path / "wide.safetensors"), 0)
    save_file({n: v for n, v in saved.items() if n != "0.bias"}, str(tmp_path / "short.safetensors"))
    with pytest.raises(KeyError, match="short.safetensors' lacks '0.bias'"):
        ema.load_file(str(tmp_path / "short.safetensors"), 0)


@pytest.mark.slow
def test_each_rank_averages_its_share_and_the_whole_is_exact(tmp_path):
    """Two ranks (torchrun, gloo) on a ZeRO-3 engine: the averages kept per partition and per share
    of the full weights, gathered, equal a plain average of the full weights (to float rounding);
    a saved average read back from its file (each rank only its rows) gathers to itself; the
    checksum and the finite-weights check, read per partition, agree with the gathered weights."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # on the CPU with gloo everywhere: two ranks on a one-GPU machine could not each have a GPU
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": repo,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
    }
    report_file = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tests.support.zero3_ema_ranks",
            str(report_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["names"] == [["0.bias", "0.weight", "2.bias", "2.weight"]] * 2 and report["shapes_equal"]
    assert report["moved_from_start"] > 1e-3
    assert report["partitions_vs_reference"] < 1e-6 and report["shares_vs_reference"] < 1e-6
    assert report["round_trip_difference"] == 0.0
    assert report["share_sizes"] == {
        "0.weight": 18,
        "0.bias": 4,
        "2.weight": 11,
        "2.bias": 2,
    }  # rank 0's half of 35, 7, 21, 3
    assert report["checksum_difference"] < 1e-9
    assert report["finite"] and not report["finite_after_nan_on_rank1"]  # rank 0 hears of rank 1's NaN
