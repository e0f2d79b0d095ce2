"""torchrun with 2 gloo processes on the CPU: same losses as one process with the global batch, identical weights,
rank-0 checkpoints that resume both ranks, and a dead rank that ends the job instead of hanging it."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from byolfast.train.loop import PREEMPT_CHECK_EVERY

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _launch(nproc: int, overrides: list[str], torchrun_args: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *torchrun_args, "-m", "byolfast.train", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(nproc: int, overrides: list[str], timeout: int = 300) -> str:
    proc = _launch(nproc, overrides)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _cfg(run, data, steps):
    # global batch 16: one process takes 16, two processes take 8 each; SyncBN makes BN see all 16.
    return tiny_overrides(run, data, "torch", steps=steps, batch=16) + ["model.bn=sync", "dist.check_every=2"]


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory, digits16):
    run = tmp_path_factory.mktemp("ddp") / "run"
    _run(2, _cfg(run, str(digits16 / "train"), 4))
    return run


def test_two_processes_match_one_process_with_the_global_batch(two_proc_run, digits16, tmp_path):
    single = tmp_path / "single"
    _run(1, _cfg(single, str(digits16 / "train"), 4))
    a, b = _losses(single), _losses(two_proc_run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:   # GlobalBatchNorm's moments vs BN's own kernel: float32 rounding only
        assert abs(a[s] - b[s]) < 2e-4, (s, a[s], b[s])
    # dist.check_every=2 hashed the weights of both ranks at steps 2 and 4 and found them identical, else the run
    # would have failed; rank 0 alone wrote the run folder
    assert [p.name for p in two_proc_run.glob("ckpt-*.pt")] == ["ckpt-00000004.pt"]


def test_rank0_checkpoint_resumes_both_ranks(two_proc_run, digits16, tmp_path):
    run = tmp_path / "resumed"
    data = str(digits16 / "train")
    _run(2, _cfg(run, data, 2))
    _run(2, _cfg(run, data, 4) + ["train.resume=auto"])
    assert _losses(run) == _losses(two_proc_run)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _rank_pids(root_pid: int) -> dict[int, int]:
    """The worker processes below torchrun, by their RANK."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e for e in env if e.startswith(b"RANK=")]
        pid, hops = int(entry.name), 0
        while ranks and pid > 1 and hops < 8:
            pid, hops = _parent(pid), hops + 1
            if pid == root_pid:
                found[int(ranks[0][5:])] = int(entry.name)
                break
    return found


def test_per_rank_batchnorm_passes_the_weight_check(digits16, tmp_path):
    # model.bn=local: each rank keeps its own BN statistics, so the check compares parameters only (it used to stop
    # the run as "weights differ across ranks").
    run = tmp_path / "local_bn"
    overrides = tiny_overrides(run, str(digits16 / "train"), "torch", steps=4, batch=16)
    _run(2, overrides + ["model.bn=local", "dist.check_every=2"])
    assert max(_losses(run)) == 4


def test_a_signal_to_one_rank_stops_both_at_one_step_and_resumes(digits16, tmp_path):
    # A preemption signal that reaches only rank 1: the ranks agree on the step (a MAX over the ranks every few
    # steps), rank 0 writes the checkpoint, both exit with 75, and a new job resumes from that step.
    run = tmp_path / "preempted"
    overrides = _cfg(run, str(digits16 / "train"), 400) + ["train.log_every=1"]
    proc = _launch(2, overrides)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.5)
    pids = _rank_pids(proc.pid)
    assert 1 in pids, "rank 1 not found"
    os.kill(pids[1], signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job did not stop after the signal")
    assert proc.returncode == 1 and out.count("exitcode  : 75") == 2, out[-3000:]   # torchrun itself exits 1
    stopped = max(_losses(run))
    assert out.count(f"preempted at step {stopped}:") == 2, out[-3000:]
    assert 1 <= stopped < 400 and stopped % PREEMPT_CHECK_EVERY == 0    # the ranks' agreement point
    assert (run / f"ckpt-{stopped:08d}.pt").is_file()
    marker = json.loads((run / "preempted.json").read_text())   # the requeue script's cue (torchrun exits 1)
    assert marker["step"] == stopped and marker["exit_status"] == 75

    # SIGUSR1 to torchrun alone, as a scheduler's warning signal reaches it: with the README's --signals-to-handle
    # it passes the signal on to the ranks (by default SIGUSR1 kills torchrun and leaves the ranks running)
    proc = _launch(2, _cfg(run, str(digits16 / "train"), 400) + ["train.log_every=1", "train.resume=auto"],
                   ("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",))
    deadline = time.time() + 180
    while time.time() < deadline and max(_losses(run)) <= stopped:
        time.sleep(0.5)
    assert not (run / "preempted.json").exists()         # a resumed run is no longer the preempted one
    proc.send_signal(signal.SIGUSR1)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        for pid in _rank_pids(proc.pid).values():   # the ranks run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job did not stop after SIGUSR1 to torchrun")
    again = json.loads((run / "preempted.json").read_text())
    assert again["step"] > stopped and again["signal"] == "SIGUSR1"
    assert out.count(f"preempted at step {again['step']}:") == 2, out[-3000:]   # both ranks, at one step
    _run(2, _cfg(run, str(digits16 / "train"), again["step"] + 2) + ["train.resume=auto"])
    assert max(_losses(run)) == again["step"] + 2 and not (run / "preempted.json").exists()


def test_a_killed_rank_ends_the_job(digits16, tmp_path):
    run = tmp_path / "killed"
    proc = _launch(2, _cfg(run, str(digits16 / "train"), 400) + ["dist.timeout_s=30"])
    deadline = time.time() + 180
    while time.time() < deadline and not ((run / "metrics.jsonl").exists()):
        time.sleep(0.5)
    pids = _rank_pids(proc.pid)
    assert 1 in pids, "rank 1 not found"
    os.kill(pids[1], signal.SIGKILL)
    start = time.time()
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after a rank died")
    assert proc.returncode != 0
    assert time.time() - start < 150
    assert "rank" in out.lower() or "failed" in out.lower()


def _exchange_flags(rank: int, init: str, results) -> None:
    import torch.distributed as dist

    from byolfast.train.distributed import FlagAgreement
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        agreement = FlagAgreement(torch.device("cpu"))
        seen = [agreement.exchange(rank == 1 and k >= 2) for k in range(5)]   # rank 1 raises its flag at call 2
        results[rank] = seen + [agreement.finish()]
    finally:
        dist.destroy_process_group()


def test_flag_agreement_gives_every_rank_the_same_answer_one_exchange_late(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_exchange_flags, args=(f"file://{tmp_path / 'store'}", results), nprocs=2)
    # call 2 starts the reduction that sees the flag and call 3 reads it; a True answer starts no new exchange, so
    # call 4 reads nothing and starts one that `finish` reads
    assert results[0] == results[1] == [False, False, False, True, False, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flag_agreement_on_cuda_reads_through_pinned_memory(tmp_path):
    # The NCCL twin of the gloo test above, in one process: the answer comes back through pinned memory + an event.
    import torch.distributed as dist

    from byolfast.train.distributed import FlagAgreement
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        agreement = FlagAgreement(torch.device("cuda"))
        assert [agreement.exchange(k == 1) for k in range(4)] == [False, False, True, False]
        assert agreement.finish() is False
    finally:
        dist.destroy_process_group()


def test_one_gpu_index_for_every_rank_is_refused(monkeypatch):
    # `train.device=cuda:0` under torchrun would stack every rank of a node on GPU 0 (checked before CUDA is touched)
    from byolfast.train import distributed
    from byolfast.train.config import ConfigError
    monkeypatch.setattr(distributed, "resolve_device", lambda name, local_rank=0: torch.device("cuda", 0))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="every rank of this node on one GPU"):
        distributed.init_distributed("cuda:0")
