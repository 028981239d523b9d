"""An exception inside a captured call: the original exception reaches the caller, hooks are removed, the file is
closed, completed runs are kept and the interrupted run is marked incomplete."""

from __future__ import annotations

import shutil

import pytest
import torch

import loopscope
from loopscope.errors import CaptureWriteError


def _fail_on_call(module, n: int, exc: BaseException):
    """A forward hook that raises ``exc`` on the module's ``n``-th call (a failing layer, an OOM, a Ctrl-C)."""
    calls = [0]

    def hook(mod, args, output):
        calls[0] += 1
        if calls[0] == n:
            raise exc

    return module.register_forward_hook(hook)


def _assert_detached(model):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
    assert "forward" not in vars(model) and "generate" not in vars(model)


@pytest.mark.parametrize("exc", [RuntimeError("layer exploded"), KeyboardInterrupt()])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_exception_in_the_model_closes_the_capture(reference_model, prompt_ids, tmp_path, exc, call):
    torch.manual_seed(1)
    with torch.no_grad():
        plain = reference_model(prompt_ids, num_steps=4).logits
    path = tmp_path / "run.h5"
    cap = loopscope.attach(reference_model, path)
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=4)  # run 0 completes
    failing = _fail_on_call(reference_model.transformer.core_block[0], 3, exc)
    with pytest.raises(type(exc)) as raised, pytest.warns(RuntimeWarning, match="closed the capture .*mode='a'"):
        if call == "forward":
            with torch.no_grad():
                reference_model(prompt_ids, num_steps=4)
        else:
            reference_model.generate(prompt_ids, num_steps=2, max_new_tokens=5, do_sample=False)
    failing.remove()
    assert raised.value is exc  # the original exception, not a wrapper
    assert cap.closed
    _assert_detached(reference_model)
    cap.close()  # a second close is harmless
    with loopscope.open(path) as capture:
        assert len(capture.runs) == 1 and capture.runs[0].states().shape[1] == 5
        assert len(capture.incomplete_runs) == 1
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(reference_model(prompt_ids, num_steps=4).logits, plain)
    with loopscope.attach(reference_model, path, mode="a"):  # the capture can be continued
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=3)
    with loopscope.open(path) as capture:
        assert [r.index for r in capture.runs] == [0, 2]


def test_exception_in_the_writer_thread_stops_recording(reference_model, prompt_ids, tmp_path):
    """The run directory is replaced by a file under a running capture: the writer cannot create the next run file;
    the failure surfaces as one clear error on a later call."""
    path = tmp_path / "run.h5"
    cap = loopscope.attach(reference_model, path)
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=2)
    cap.flush()
    shutil.rmtree(str(path) + ".runs")
    (tmp_path / "run.h5.runs").write_text("not a directory")
    with pytest.raises(CaptureWriteError, match="recording stopped"), pytest.warns(RuntimeWarning, match="closed"):
        for _ in range(10):  # the writer is asynchronous: the failure surfaces on a later call
            with torch.no_grad():
                reference_model(prompt_ids, num_steps=2)
            cap.flush()
    assert cap.closed
    _assert_detached(reference_model)
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=2)  # the model runs on, unhooked


def test_exception_in_a_later_model_hook_marks_the_run_incomplete_and_frees_its_slabs(
    reference_model, prompt_ids, tmp_path
):
    """A model-level hook of someone else raises after the forward ran (outside loopscope's forward wrapper): the
    capture goes on, the interrupted run is left partial, and its staged slabs return to the pool."""
    path = tmp_path / "run.h5"
    cap = loopscope.attach(reference_model, path)
    calls = [0]

    def flaky(module, args, output):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("someone else's hook")

    handle = reference_model.register_forward_hook(flaky, prepend=True)  # runs before loopscope's exit hook
    with pytest.raises(RuntimeError, match="someone else's hook"):
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=3)
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=3)
    handle.remove()
    cap.flush()
    free = sum(s.numel() * s.element_size() for slabs in cap.pool._free.values() for s in slabs)
    assert free == cap.pool.stats.allocated_bytes  # every slab is back: none kept by the interrupted forward
    cap.close()
    with loopscope.open(path) as capture:
        assert [r.index for r in capture.runs] == [1] and len(capture.incomplete_runs) == 1
