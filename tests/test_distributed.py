"""Multi-process sampling: 2 CPU ranks (gloo) on torchrun give exactly the one-process samples."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastrev
from fastrev import distributed
from fastrev.models import GaussianMixture

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = dict(method="ddpm", num_steps=12, seed=11, batch_size=3)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, tmp_path, timeout=240):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=tmp_path)
    return res


def test_shard_range_covers_every_index_once():
    for n in (0, 1, 7, 10, 64):
        for w in (1, 2, 3, 8):
            spans = [distributed.shard_range(n, r, w) for r in range(w)]
            idx = [i for s, c in spans for i in range(s, s + c)]
            assert idx == list(range(n))
            assert max(c for _, c in spans) - min(c for _, c in spans) <= 1


def test_single_process_is_plain_sample():
    model = GaussianMixture.demo_2d()
    a = distributed.sample(model, (7, 2), model.schedule, **ARGS)
    b = fastrev.sample(model, (7, 2), model.schedule, **ARGS)
    assert torch.equal(a, b)


SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from fastrev import distributed
    from fastrev.models import GaussianMixture
    model = GaussianMixture.demo_2d()
    fail_rank = int(sys.argv[3])
    if dist.is_available() and fail_rank >= 0:
        import os
        if int(os.environ["RANK"]) == fail_rank:
            raise RuntimeError("rank failed on purpose")
    out = distributed.sample(model, (int(sys.argv[2]), 2), model.schedule, method="ddpm", num_steps=12, seed=11,
                             batch_size=3, shard_dir=sys.argv[1] + "/shards", timeout_s=60)
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1] + "/out.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def test_two_ranks_equal_one_process(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    res = _run(TORCHRUN + [str(tmp_path / "run.py"), str(tmp_path), "11", "-1"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    model = GaussianMixture.demo_2d()
    want = fastrev.sample(model, (11, 2), model.schedule, **{**ARGS, "batch_size": 4})  # other chunking: no matter
    assert torch.equal(got, want)
    assert torch.equal(distributed.load_shards(tmp_path / "shards"), want)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000-of-00002.pt",
                                                                       "shard-00001-of-00002.pt"]


def test_cli_on_torchrun_equals_one_process(tmp_path):
    common = ["sample", "--demo", "gmm", "--method", "ddim", "--num-samples", "9", "--num-steps", "10",
              "--seed", "5", "--batch-size", "2"]
    res = _run(TORCHRUN + ["-m", "fastrev"] + common + ["--out", "dist.pt", "--shard-dir", "sh"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    one = _run([sys.executable, "-m", "fastrev"] + common + ["--out", "one.pt"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "dist.pt"), torch.load(tmp_path / "one.pt")
    assert a.shape == (9, 2) and torch.equal(a, b)
    assert torch.equal(distributed.load_shards(tmp_path / "sh"), b)


def test_a_failing_rank_ends_the_job(tmp_path):
    (tmp_path / "run.py").write_text(SCRIPT)
    res = _run(TORCHRUN + [str(tmp_path / "run.py"), str(tmp_path), "11", "1"], tmp_path, timeout=180)
    assert res.returncode != 0
    assert "rank failed on purpose" in res.stderr + res.stdout


def test_load_shards_rejects_incomplete(tmp_path):
    torch.save({"start": 5, "count": 5, "world_size": 2, "samples": torch.zeros(5, 2)},
               tmp_path / "shard-00001-of-00002.pt")
    with pytest.raises(ValueError, match="incomplete"):
        distributed.load_shards(tmp_path)
    with pytest.raises(ValueError, match="no shard"):
        distributed.load_shards(tmp_path / "nothing")


def test_bad_timeout():
    model = GaussianMixture.demo_2d()
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.sample(model, (2, 2), model.schedule, timeout_s=0)
