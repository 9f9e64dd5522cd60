"""Multi-process sampling: 2 CPU ranks (gloo) on torchrun give exactly the one-process samples."""

import os
import subprocess
import sys
import textwrap
import time

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
    # One torchrun launch (each costs seconds of process start-up), three checks in turn.
    import os, pathlib, sys, time
    import torch, torch.distributed as dist
    from fastrev import distributed
    from fastrev.cli import main
    from fastrev.models import GaussianMixture
    out, rank = pathlib.Path(sys.argv[1]), int(os.environ["RANK"])
    model = GaussianMixture.demo_2d()
    # 1. the library: uneven shares (11 samples over 2 ranks), shards on disk, the gathered result on every rank
    x = distributed.sample(model, (11, 2), model.schedule, method="ddpm", num_steps=12, seed=11, batch_size=3,
                           shard_dir=out / "shards", timeout_s=60)
    torch.save(x, out / f"lib-rank{rank}.pt")
    # 2. the command line under torchrun (what `torchrun -m fastrev sample ...` runs): rank 0 writes --out, every
    #    rank its shard; it ends the process group
    rc = main(["sample", "--demo", "gmm", "--method", "ddim", "--num-samples", "9", "--num-steps", "10", "--seed",
               "5", "--batch-size", "2", "--out", str(out / "cli.pt"), "--shard-dir", str(out / "cli-shards")])
    assert rc == 0 and not dist.is_initialized(), rc
    # 3. a failing rank ends the job: rank 0 waits for rank 1 in a new group until torchrun stops it
    (out / f"phase3-rank{rank}").write_text(repr(time.time()))
    if rank == 1:
        raise RuntimeError("rank failed on purpose")
    distributed.sample(model, (4, 2), model.schedule, num_steps=2, timeout_s=60)
    (out / "rank0-was-not-stopped").touch()
""")


def test_torchrun_two_ranks(tmp_path):
    """Two CPU ranks on torchrun: the library and the CLI give exactly the one-process samples (shards too); a
    rank that fails ends the job instead of leaving its peer waiting (the group's 60 s timeout is not what ends it)."""
    (tmp_path / "run.py").write_text(SCRIPT)
    res = _run(TORCHRUN + [str(tmp_path / "run.py"), str(tmp_path)], tmp_path)
    ended = time.time()
    log = res.stderr[-3000:] + res.stdout[-1000:]
    # 1. the library
    model = GaussianMixture.demo_2d()
    want = fastrev.sample(model, (11, 2), model.schedule, **{**ARGS, "batch_size": 4})  # other chunking: no matter
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"lib-rank{rank}.pt"), want), log
    assert torch.equal(distributed.load_shards(tmp_path / "shards"), want)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000-of-00002.pt",
                                                                       "shard-00001-of-00002.pt"]
    # 2. the command line (which is fastrev.sample in one process: tests/test_cli.py)
    s = fastrev.Schedule.linear()
    one = fastrev.sample(GaussianMixture.demo_2d(s), (9, 2), s, method="ddim", num_steps=10, seed=5)
    got = torch.load(tmp_path / "cli.pt")
    assert got.shape == (9, 2) and torch.equal(got, one)
    assert torch.equal(distributed.load_shards(tmp_path / "cli-shards"), one)
    # 3. the failing rank
    assert (tmp_path / "phase3-rank0").exists() and (tmp_path / "phase3-rank1").exists(), log
    assert res.returncode != 0 and "rank failed on purpose" in res.stderr + res.stdout
    assert not (tmp_path / "rank0-was-not-stopped").exists()
    assert ended - float((tmp_path / "phase3-rank0").read_text()) < 50, "rank 0 ran into the group timeout"


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
