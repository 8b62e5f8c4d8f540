"""1-bit Adam (`optimizer.name: onebit_adam`): the compression and its error feedback, the compressed
average across real gloo ranks, equality with AdamW before the freeze, bytes on the wire, bit-exact
resume with the error buffers, and the inputs it refuses."""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from conftest import assert_user_error, metrics, run_cli, small_run_config, write_config
from rewarm.optim.compression import compress, compressed_average, layout, pack_signs, unpack_signs

STEPS = {"train.max_steps": 20, "eval.interval": 10, "checkpoint.interval": 5, "checkpoint.keep_last": 5,
         "train.num_threads": 1}
FREEZE = 8


def test_pack_and_unpack_signs_round_trip():
    x = torch.randn(5, 64)
    x[0, :8] = 0.0  # sign(0) is +1
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 8)
    assert torch.equal(unpack_signs(packed), torch.where(x >= 0, 1.0, -1.0))
    assert pack_signs(torch.tensor([1.0, -1, -1, -1, -1, -1, -1, 1])).item() == 0b10000001


def test_compression_keeps_each_chunks_norm_and_zero_padding():
    chunk, valid = layout(21, 2)  # 21 values over 2 ranks: chunks of 16, the last 11 padding
    assert chunk == 16 and valid.sum() == 21
    c = torch.zeros(2, chunk)
    c[valid] = torch.randn(21)
    packed, scale, sent = compress(c, valid)
    assert packed.shape == (2, 2) and scale.shape == (2,)
    assert torch.allclose(sent.norm(dim=1), c.norm(dim=1))  # ‖C(c)‖ = ‖c‖ per chunk
    assert torch.all(sent[~valid] == 0)  # padding never carries anything
    assert torch.equal(torch.sign(sent[valid]), torch.where(c[valid] >= 0, 1.0, -1.0))


def test_error_feedback_loses_nothing():
    """Σ sent + final error = Σ inputs: what compression drops is carried, not lost (fp64: to rounding)."""
    torch.manual_seed(0)
    chunk, valid = layout(100, 1)
    error = torch.zeros(1, chunk, dtype=torch.float64)
    total_in = torch.zeros(1, chunk, dtype=torch.float64)
    total_sent = torch.zeros_like(total_in)
    for _ in range(50):
        x = torch.zeros(1, chunk, dtype=torch.float64)
        x[valid] = torch.randn(100, dtype=torch.float64)
        c = x + error
        _, _, sent = compress(c, valid)
        error = c - sent
        total_in += x
        total_sent += sent
    assert torch.allclose(total_sent + error, total_in, rtol=0, atol=1e-12)
    assert error.abs().max() < 10  # bounded: the feedback does not blow up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    m = torch.randn(37, 5)  # 185 values: not a multiple of world × 8, so padding is exercised
    truth = m.clone()
    dist.all_reduce(truth)
    truth /= world
    chunk, _ = layout(m.numel(), world)
    worker, server = torch.zeros(world * chunk), torch.zeros(chunk)
    outputs = []
    for _ in range(400):
        avg, sent = compressed_average(m, worker, server)
        outputs.append(avg)
    first = (outputs[0] - truth).norm() / truth.norm()
    running = [(torch.stack(outputs[:k]).mean(0) - truth).norm() / truth.norm() for k in (10, 100, 400)]
    same = torch.stack(outputs).clone()
    dist.broadcast(same, 0)
    torch.save({"first": first, "running": running, "agree": torch.equal(same, torch.stack(outputs)), "sent": sent,
                "chunk": chunk}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_compressed_average_converges_to_the_true_average(tmp_path, world):
    """The same momentum sent again and again: the mean of what comes back approaches the true average
    across ranks (error feedback at work), while a single exchange is far off (1 bit per value)."""
    mp.spawn(_average_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["agree"]  # every rank ends up with the same average
        assert r["first"] > 0.2  # one exchange at 1 bit per value is rough ...
        assert r["running"][0] > r["running"][1] > r["running"][2]  # ... the running mean keeps improving
        assert r["running"][2] < 0.02
        row = r["chunk"] // 8 + 4  # packed signs + one fp32 scale
        assert r["sent"] == 2 * (world - 1) * row


# -- real training under torchrun --------------------------------------------------------------

def torchrun(cfg, *extra, nproc="2"):
    return run_cli("train", str(cfg), "-q", "--nproc", nproc, *extra, timeout=300, subprocess=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shards):
    """AdamW and 1-bit Adam (freeze at step 8) on 2 gloo ranks, same data and seed."""
    root = tmp_path_factory.mktemp("onebit")
    out = {}
    for name, extra in (("adamw", {}), ("onebit", {"optimizer.name": "onebit_adam",
                                                   "optimizer.options": {"freeze_step": FREEZE}})):
        cfg = write_config(root / f"{name}.yaml", small_run_config(root / name, shards, **STEPS, **extra))
        proc = torchrun(cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (cfg, root / name)
    return out


def _weights(run, step):
    return load_file(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


def test_before_the_freeze_it_is_adamw(two_runs):
    a, b = metrics(two_runs["adamw"][1], "train"), metrics(two_runs["onebit"][1], "train")
    assert [e["step"] for e in b] == list(range(1, 21))
    for x, y in zip(a[:FREEZE], b[:FREEZE]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-6), x["step"]
        assert y["onebit_phase"] == "warmup"
    wa, wb = _weights(two_runs["adamw"][1], 5), _weights(two_runs["onebit"][1], 5)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    # after the freeze it is a different optimizer, but it still trains
    assert all(e["onebit_phase"] == "compression" for e in b[FREEZE:])
    assert b[-1]["loss"] < b[0]["loss"]


def test_bytes_on_the_wire_fall_about_32_fold(two_runs):
    b = metrics(two_runs["onebit"][1], "train")
    warm = {e["comm_bytes"] for e in b[:FREEZE]}
    comp = {e["comm_bytes"] for e in b[FREEZE:]}
    assert len(warm) == 1 and len(comp) == 1  # the same tensors every step
    ratio = warm.pop() / comp.pop()
    assert 20 < ratio < 33, ratio  # 32× minus the per-chunk scales and the padding to 8


def _moved(copy):
    """A copied run directory's own config, pointed at the copy."""
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["out_dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    return copy / "config.yaml"


def test_resume_in_the_compression_phase_is_bit_exact(two_runs, tmp_path):
    _, run = two_runs["onebit"]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg2 = _moved(copy)
    for step in (20,):
        shutil.rmtree(copy / "checkpoints" / f"step_{step:06d}")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    state = torch.load(copy / "checkpoints" / "step_000015" / "trainer_state.pt", weights_only=False)
    errors = [s for s in state["optimizer"]["state"].values() if "worker_error" in s]
    assert errors and all(s["worker_error"].shape[0] == 2 for s in errors)  # both ranks' buffers
    assert not torch.equal(errors[0]["worker_error"][0], errors[0]["worker_error"][1])
    proc = torchrun(cfg2, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    strip = lambda es: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in es]  # noqa: E731
    assert strip(metrics(copy, "train")) == strip(metrics(run, "train"))
    for k, v in load_file(copy / "final" / "model.safetensors").items():
        assert torch.equal(v, load_file(run / "final" / "model.safetensors")[k]), k
    # at another world size the error buffers cannot be split: they restart, and the log says so
    shutil.rmtree(copy / "checkpoints" / "step_000020")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    one = run_cli("train", str(cfg2), "--resume", timeout=300, subprocess=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "restart at zero" in one.stderr and "nothing to compress" in one.stderr


def test_bad_inputs_are_refused_with_a_reason(two_runs, tmp_path, shards):
    def cfg(**extra):
        return write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "r", shards, **STEPS, **extra))

    onebit = {"optimizer.name": "onebit_adam"}
    assert_user_error(run_cli("train", str(cfg(**onebit, **{"distributed.strategy": "fsdp"}))), "data-parallel", "ddp")
    # under --nproc the config is checked once, before torchrun starts: one message, exit 2, no traceback
    proc = torchrun(cfg(**onebit, **{"optimizer.options": {"freeze_step": -1}}))
    assert_user_error(proc, "freeze_step")
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert_user_error(run_cli("train", str(cfg()), "--nproc", "-1"), "--nproc")
    assert_user_error(run_cli("train", str(cfg(**onebit, **{"optimizer.options": {"freeze_step": 20}}))),
                      "never compress")
    assert_user_error(run_cli("train", str(cfg(**onebit, **{"optimizer.options": {"freeze_after": 0.1}}))),
                      "freeze_after_warmup")
    assert_user_error(run_cli("train", str(cfg(**{"optimizer.name": "onebit"}))), "onebit_adam")
    assert_user_error(run_cli("train", str(cfg(**{"optimizer.options": {"freeze_step": 3}}))), "takes none")
    # an AdamW run resumed as 1-bit Adam: refused unless allowed, with what carries over
    _, adamw_run = two_runs["adamw"]
    copy = tmp_path / "adamw"
    shutil.copytree(adamw_run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000020")
    shutil.rmtree(copy / "final")
    (copy / "summary.json").unlink()
    raw = yaml.safe_load(_moved(copy).read_text())
    raw["optimizer"].update(name="onebit_adam", options={"freeze_step": 16})
    switched = write_config(tmp_path / "switch.yaml", raw)
    assert_user_error(run_cli("train", str(switched), "--resume"), "optimizer.name", "carry over", "--allow-config-change")
    proc = torchrun(switched, "--resume", "--allow-config-change")
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = [e.get("onebit_phase") for e in metrics(copy, "train")]
    assert phases[:15] == [None] * 15 and phases[15] == "warmup" and phases[16:] == ["compression"] * 4
