"""Shared fixtures: the Huginn-shaped reference model and its tokenizer, built offline from tiny configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope
from loopscope.models.demo_tokenizer import build_tokenizer
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def new_reference_model(tokenizer):
    """A factory of tiny reference models (fixed seed), for fixtures of a wider scope than one test."""

    def build(seed: int = 0) -> RavenReferenceForCausalLM:
        register()
        torch.manual_seed(seed)
        config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer))
        return RavenReferenceForCausalLM(config).eval()

    return build


@pytest.fixture(scope="session")
def two_run_capture(tokenizer, new_reference_model):
    """A factory of real captures with two runs: run 0 a greedy generate(), run 1 a forward over the prompt."""

    def capture(path, prompt: str, generate_steps: int, new_tokens: int, forward_steps: int):
        model = new_reference_model()
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with loopscope.attach(model, path, tokenizer=tokenizer):
            torch.manual_seed(0)
            model.generate(ids, num_steps=generate_steps, max_new_tokens=new_tokens, do_sample=False)
            with torch.no_grad():
                model(ids, num_steps=forward_steps)
        return path

    return capture


@pytest.fixture(scope="session")
def new_hrm_text_model():
    """A factory of tiny HRM-Text models (transformers 5.x, which has the class; skipped on 4.x)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "HrmTextConfig"):
        pytest.skip("hrm_text needs transformers 5.x")

    def build(h_cycles: int = 2, l_cycles: int = 3, seed: int = 0):
        config = transformers.HrmTextConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, H_cycles=h_cycles, L_cycles=l_cycles, num_layers_per_stack=1,
        )  # fmt: skip
        torch.manual_seed(seed)
        return transformers.HrmTextForCausalLM(config).eval()

    return build


@pytest.fixture(scope="session")
def hrm_capture(tmp_path_factory, new_hrm_text_model):
    """A real HRM-Text capture of ``new_hrm_text_model()``: one forward of 10 tokens, loops H and L (L has no
    readout). Shared by the tests that read it; none may change it."""
    path = tmp_path_factory.mktemp("hrm") / "hrm.h5"
    model = new_hrm_text_model()
    with loopscope.attach(model, path), torch.no_grad():
        model(torch.randint(3, 100, (1, 10)))
    return path


@pytest.fixture
def reference_model(new_reference_model):
    """A fresh tiny reference model (fixed seed) per test, so hooks from one test never leak into another."""
    return new_reference_model()


@pytest.fixture
def prompt_ids(tokenizer):
    return tokenizer("Looped models think by iterating.", return_tensors="pt").input_ids


class ReferenceRecorder:
    """A hand-written capture to compare loopscope against: plain hooks that clone what they see."""

    def __init__(self, model):
        self.s0: list[torch.Tensor] = []
        self.states: list[torch.Tensor] = []
        hidden = model.config.n_embd
        self._first = True

        def on_adapter(module, args):
            self.s0.append(args[0][..., :hidden].detach().clone())

        def on_exit(module, args, output):
            self.states.append(output.detach().clone())

        self.handles = [
            model.transformer.adapter.register_forward_pre_hook(on_adapter),
            model.transformer.core_block[-1].register_forward_hook(on_exit),
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def reference_recorder():
    recorders = []

    def make(model):
        recorder = ReferenceRecorder(model)
        recorders.append(recorder)
        return recorder

    yield make
    for recorder in recorders:
        recorder.remove()


class ForwardRecorder:
    """A hand-written capture for any model: per top-level forward, what chosen modules saw (cloned), in call order.

    ``hooks`` maps a name to ``(module, "pre" | "post")``: "pre" keeps the first positional input (or the
    ``hidden_states`` keyword), "post" keeps the output (its first element when it is a tuple).
    """

    def __init__(self, model, hooks):
        self.forwards: list[dict[str, list[torch.Tensor]]] = []
        self.handles = [model.register_forward_pre_hook(lambda m, a: self.forwards.append({n: [] for n in hooks}))]
        for name, (module, kind) in hooks.items():
            if kind == "pre":

                def pre(m, args, kwargs, name=name):
                    value = args[0] if args else kwargs.get("hidden_states")
                    self.forwards[-1][name].append(value.detach().clone())

                self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(m, args, output, name=name):
                    value = output[0] if isinstance(output, tuple) else output
                    self.forwards[-1][name].append(value.detach().clone())

                self.handles.append(module.register_forward_hook(post))

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def forward_recorder():
    """A factory of :class:`ForwardRecorder` whose hooks are removed when the test ends."""
    recorders = []

    def make(model, hooks):
        recorder = ForwardRecorder(model, hooks)
        recorders.append(recorder)
        return recorder

    yield make
    for recorder in recorders:
        recorder.remove()


class _Double(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


class StateChangedInPlace(torch.nn.Module):
    """A looped model (``loop="block"``) that scales each iteration's output in place right after the block returns
    it, as ``h += inp`` would: s0 = 1, then the block's outputs are 2, 1, 0.5, ... as the hooks see them."""

    def __init__(self, hidden: int = 4096, steps: int = 6):
        super().__init__()
        self.block = _Double()
        self.hidden, self.steps = hidden, steps

    def forward(self, input_ids):
        x = torch.ones(*input_ids.shape, self.hidden, device=input_ids.device)
        for _ in range(self.steps):
            x = self.block(x)
            x.mul_(0.25)
        return x

    def expected(self) -> np.ndarray:
        """[steps + 1] what every row of a token's trajectory holds (s0, then each block output)."""
        return np.float32([1.0] + [2.0 * 0.5**k for k in range(self.steps)])


@pytest.fixture
def state_changed_in_place():
    """The :class:`StateChangedInPlace` class, to build with the sizes a test needs."""
    return StateChangedInPlace


@pytest.fixture(scope="module")
def pristine(two_run_capture, tmp_path_factory):
    """A small real capture (a generate run and a forward run) that tests copy and then damage."""
    return two_run_capture(tmp_path_factory.mktemp("pristine") / "cap.h5", "Short prompt.", 3, 2, 2)
