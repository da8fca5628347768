"""Where the anchor lives and computes: it follows its parameters' device, finds its matrices under checkpoint /
compile wrappers, computes bases on the accelerator (or on all CPU cores), broadcasts on the group's device, and
syncs the host once per step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rpsft.anchor as anchor_mod
import rpsft.distributed as distributed
import rpsft.placement as placement
from rpsft.anchor import RotationAnchor
from rpsft.bases import Bases

from rpsft_testing import make_tiny_llama

RANKS = {"down_proj": 1.0, "*": 4}  # low-rank terms and full-rank (W0) terms


class DeviceLog(TorchDispatchMode):
    """Every op run under it, with the devices of the tensors it produced (and how many host syncs happened)."""

    def __init__(self):
        super().__init__()
        self.devices: list[tuple[str, set[str]]] = []
        self.scalar_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:  # .item() / float(tensor)
            self.scalar_syncs += 1
        leaves = out if isinstance(out, (tuple, list)) else [out]
        self.devices.append((str(func), {t.device.type for t in leaves if isinstance(t, torch.Tensor)}))
        return out


def perturb_(model, scale=1e-2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def model():
    return make_tiny_llama(64, inter=80)


# ----------------------------------------------------------------------------------------- the parameter's device


def test_anchor_built_on_cpu_follows_the_model_to_another_device(model):
    anchor = RotationAnchor.from_model(model, rank=RANKS)
    assert {x.device.type for t in anchor.terms.values() for x in t.tensors()} == {"cpu"}
    model.to("meta")
    R = anchor.penalty(model, record=True)
    assert R.device.type == "meta"  # computed where the weights are, not on the CPU
    assert {x.device.type for t in anchor.terms.values() for x in t.tensors()} == {"meta"}
    assert len(anchor.last_sq) == len(anchor)


def test_gradient_path_makes_every_tensor_on_the_parameters_device(model):
    anchor = RotationAnchor.from_model(model, rank=RANKS)
    model.to("meta")
    with DeviceLog() as log:
        r = anchor.accumulate_grad_(model, weight=0.5)
    for name, p in model.named_parameters():
        if name in anchor.terms:
            assert p.grad is not None and p.grad.device.type == "meta", name
    made_elsewhere = [(op, d) for op, d in log.devices if d - {"meta"}]
    # not even the per-step host copy of the stacked ‖A‖²: meta holds no values, so it reports NaN instead
    assert made_elsewhere == [], made_elsewhere
    assert r != r and anchor.drift(model)  # NaN sum on meta; drift() runs there too


def test_lora_anchor_follows_the_model(model):
    from peft import LoraConfig, get_peft_model

    from rpsft.methods.rpsft_lora import LoraRotationAnchor

    targets = ["q_proj", "v_proj", "down_proj"]
    dense = RotationAnchor.from_model(model, rank=RANKS, targets=targets)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    lora = LoraRotationAnchor.from_dense(dense, peft)
    peft.to("meta")
    assert lora.penalty(peft).device.type == "meta"
    with DeviceLog() as log:
        lora.accumulate_grad_(peft, weight=1.0)
    assert [(op, d) for op, d in log.devices if d - {"meta"}] == []
    assert {x.device.type for t in lora.terms.values() for x in t.tensors()} == {"meta"}


# ------------------------------------------------------------------------------------------ wrapped parameter names


def _checkpoint_wrap(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    layer_cls = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_cls))
    return model


@pytest.mark.numerics
def test_checkpoint_wrapped_and_compiled_names_resolve(model):
    anchor = RotationAnchor.from_model(model, rank=RANKS)
    perturb_(model)
    ref = anchor.drift(model)
    r_ref = anchor.penalty(model).item()
    _checkpoint_wrap(model)
    names = [n for n, _ in model.named_parameters()]
    assert any("_checkpoint_wrapped_module." in n for n in names)  # the wrapper really renamed them
    assert anchor.drift(model) == ref
    assert anchor.penalty(model).item() == pytest.approx(r_ref, rel=1e-6)

    class Compiled(torch.nn.Module):  # torch.compile's OptimizedModule keeps the model as `_orig_mod`
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    wrapped = Compiled(model)
    assert all(n.startswith("_orig_mod.") for n, _ in wrapped.named_parameters())
    model.zero_grad(set_to_none=True)
    assert anchor.accumulate_grad_(wrapped, 1.0) == pytest.approx(r_ref, rel=1e-6)
    assert anchor.drift(wrapped) == ref


def test_lora_anchor_resolves_checkpoint_wrapped_layers(model):
    from peft import LoraConfig, get_peft_model

    from rpsft.methods.rpsft_lora import LoraRotationAnchor

    dense = RotationAnchor.from_model(model, rank=RANKS, targets=["q_proj", "down_proj"])
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    lora = LoraRotationAnchor.from_dense(dense, peft)
    for n, p in peft.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, 0, 0.1)
    ref = lora.drift(peft)
    _checkpoint_wrap(peft.get_base_model())
    assert any("_checkpoint_wrapped_module" in n for n, _ in peft.named_parameters())
    assert lora.drift(peft) == ref


# ----------------------------------------------------------------------------------------- where bases are computed


def test_bases_device_prefers_the_accelerator(monkeypatch):
    cpu_w = torch.zeros(2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement.bases_device(cpu_w) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert placement.bases_device(cpu_w) == torch.device("cuda", 3)  # model still on CPU, GPU present


def test_from_model_computes_on_bases_device_and_stores_where_the_parameter_is(model, monkeypatch):
    seen = []

    def fake_get_bases(W, k, **kw):
        seen.append(W.device.type)
        m, n = W.shape
        q = torch.linalg.qr(torch.randn(max(m, n), max(m, n)))[0]
        return Bases(q[:m, :k].contiguous(), torch.ones(k), q[:n, :k].contiguous())

    monkeypatch.setattr(anchor_mod, "bases_device", lambda p: torch.device("meta"))
    monkeypatch.setattr(anchor_mod, "get_bases", fake_get_bases)
    anchor = RotationAnchor.from_model(model, rank=4)
    assert seen and set(seen) == {"meta"}  # the SVD input went to the chosen device
    assert {x.device.type for t in anchor.terms.values() for x in t.tensors()} == {"cpu"}


def test_cpu_svds_use_all_cores_then_restore(model, monkeypatch):
    monkeypatch.setattr(placement.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = []
    real = anchor_mod.get_bases
    monkeypatch.setattr(anchor_mod, "get_bases", lambda *a, **kw: threads.append(torch.get_num_threads())
                        or real(*a, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as under `accelerate launch` (OMP_NUM_THREADS=1)
    try:
        RotationAnchor.from_model(model, rank=4)
        assert threads and set(threads) == {4}
        assert torch.get_num_threads() == 1  # restored
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the node share the cores
        assert placement.cpu_budget() == 2
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------- the broadcast buffer


@pytest.mark.parametrize("backend, preferred, expected", [
    ("nccl", "cpu", "cuda:0"),  # DeepSpeed / plain multi-GPU launch: no CPU backend
    ("gloo", "cpu", "cpu"),
    ("gloo", "cuda:0", "cuda:0"),
    ("cuda:nccl,cpu:gloo", "cpu", "cuda:0"),  # accelerate's FSDP2 group: NCCL, not gloo over TCP
    ("cuda:nccl,cpu:gloo", "cuda:0", "cuda:0"),
    ("cpu:gloo,cuda:gloo", "cpu", "cpu"),  # no NCCL in the group: stay where the data is
    ("nccl", "cuda:0", "cuda:0"),
    ("mpi", "cuda:0", "cpu"),
])
def test_collective_device_follows_the_backend(monkeypatch, backend, preferred, expected):
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert distributed.collective_device(torch.device(preferred)) == torch.device(expected)


def test_bases_travel_over_nccl_in_the_fsdp2_group_and_come_back(model, monkeypatch):
    """accelerate's FSDP2 group (``cuda:nccl,cpu:gloo``, mocked on 2 ranks) and the model still on the CPU: every
    bases broadcast asks for a buffer on the GPU (NCCL), not on the CPU (gloo over TCP), and the anchor keeps what
    it received where its parameters are. Without a GPU here the buffer is redirected to the CPU after the choice is
    recorded; the broadcast leaves it as it is (each rank's own values for the matrices it owns)."""
    monkeypatch.setattr(anchor_mod, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "cuda:nccl,cpu:gloo")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    chosen = []
    monkeypatch.setattr(anchor_mod, "collective_device",
                        lambda d, group=None: chosen.append(distributed.collective_device(d, group)) or d)
    sent = []
    monkeypatch.setattr(anchor_mod, "broadcast_", lambda t, src: sent.append(src) or t)
    anchor = RotationAnchor.from_model(model, rank=4)
    assert len(chosen) == len(sent) == len(anchor) == 14  # one broadcast per matrix
    assert set(chosen) == {torch.device("cuda", 0)}
    assert {t.U.device.type for t in anchor.terms.values()} == {"cpu"}


def test_bases_broadcast_buffer_is_on_the_nccl_device(model, monkeypatch):
    """A 2-rank NCCL-only group (mocked): the flat broadcast buffer must be a CUDA tensor, not a CPU one. Without a
    GPU in the test machine the allocation on cuda is what fails — on the buffer, never inside the broadcast."""
    monkeypatch.setattr(anchor_mod, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sent = []
    monkeypatch.setattr(anchor_mod, "broadcast_", lambda t, src: sent.append(t.device.type) or t)
    if torch.backends.cuda.is_built():
        pytest.skip("checks the allocation through CPU-only torch refusing cuda:0")
    with pytest.raises((AssertionError, RuntimeError), match="(?i)cuda"):  # CPU-only torch refuses cuda:0
        RotationAnchor.from_model(model, rank=4)
    assert sent == []  # nothing was broadcast from a CPU buffer first


# ------------------------------------------------------------------------------------------------- host syncs


@pytest.mark.numerics
def test_penalty_record_syncs_the_host_once(model):
    anchor = RotationAnchor.from_model(model, rank=RANKS)
    perturb_(model)
    ref = copy.deepcopy(anchor)
    with DeviceLog() as log:
        R = anchor.penalty(model, record=True)
    assert log.scalar_syncs == 0  # no .item()/float() per matrix: one stacked copy
    assert len(anchor.last_sq) == len(anchor) == 14
    assert sum(anchor.last_sq.values()) == pytest.approx(R.item(), rel=1e-6)
    assert ref.accumulate_grad_(model, 0.0) == pytest.approx(R.item(), rel=1e-6)
    assert anchor.last_sq == pytest.approx(ref.last_sq, rel=1e-6)
