"""runstate.py: RunState round-trips, a checkpoint that cannot be written, and files that
cannot be read safely."""

import os
import random

import numpy as np
import pytest
import torch

import densenet
from training import engine, runstate


def tiny_state(seed: int) -> "runstate.RunState":
    torch.manual_seed(seed)
    net = densenet.densenet_cifar(10, 4, in_channels=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return runstate.RunState(net, opt, sched, scaler, torch.Generator().manual_seed(seed))


def test_run_state_round_trips(tmp_path):
    a = tiny_state(0)
    engine.train_step(a.model, a.optimizer, a.scaler, torch.randn(4, 1, 28, 28),
                            torch.tensor([0, 1, 2, 3]), "off")  # fmt: skip
    for _ in range(3):  # past the drop at 2: the resumed schedule is replayed to epoch 3
        a.scheduler.step()
    a.epoch, a.step, a.best, a.seconds = 3, 7, 12.5, 4.25
    a.sums += torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.randint(0, 10, (5,), generator=a.data_generator)
    a.data_rng = a.data_generator.get_state()
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    runstate.atomic_save(a.state_dict(), tmp_path / "s.pt")
    random.random(), np.random.rand(), torch.rand(1)  # every stream moves on after the save
    b = tiny_state(1)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert (b.epoch, b.step, b.best, b.seconds) == (3, 7, 12.5, 4.25)
    assert torch.equal(b.sums, a.sums) and torch.equal(b.data_generator.get_state(), a.data_rng)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    # The process's streams are back where they were at the save, read without runstate
    python, (kind, keys, *rest), torch_state = saved
    assert random.getstate() == python
    now_kind, now_keys, *now_rest = np.random.get_state()
    assert (now_kind, now_rest) == (kind, rest) and np.array_equal(now_keys, keys)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path):
    state = tiny_state(0)
    with pytest.raises(runstate.CheckpointError, match="cannot write .*latest.pt: No such file"):
        state.save([tmp_path / "gone" / "latest.pt"], {})


class _RunsAShellCommand:
    """Unpickling this calls os.system: a checkpoint that would run code when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused_naming_the_call(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": _RunsAShellCommand(marker)}, path)
    with pytest.raises(ValueError) as info:
        runstate.load_file(path)
    message = str(info.value)
    assert "\n" not in message
    assert "refused because it asks to import or call something" in message
    assert "(os.system)" in message
    assert not marker.exists()


def test_truncated_checkpoint_is_truncated_or_corrupt_in_one_line(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"weight": torch.ones(3, 3)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError) as info:
        runstate.load_file(path)
    message = str(info.value)
    assert "\n" not in message and "truncated or corrupt" in message




def test_garbage_is_corrupt_in_one_line(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read .*garbage.pth: truncated or corrupt"):
        runstate.load_file(path)
