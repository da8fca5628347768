"""The memory plan of a training run: per-rank bytes from the model's config and the launcher, before anything loads.

``rpsft plan --config C [--launcher fsdp2] [--gpus 8] [--gpu-memory 80GiB]`` prints it; ``rpsft train`` prints it
before the model loads and refuses, in one line naming a setting that fits, a run that cannot fit, and one whose
16-bit weights would not move at its learning rate. The model is built on the meta device from its config (no
weights): a local checkpoint's config.json, the hub's, or, when the hub cannot be reached, a shape shipped in
``rpsft/resources/model_shapes/`` (config.json fields only).

What a rank holds (docs/memory.md has the derivation and the measurement):

* **persistent** — weights (sharded by the world size under FSDP2, whose mixed precision keeps fp32 shards), Adam's
  two states per trainable weight (in the weight's dtype; fp32 and partitioned under ZeRO), ZeRO's fp32 master
  weights, DDP's gradient buckets (a second copy of the gradients), the anchor (``rpsft.frames.anchor_nbytes``, the
  formula ``rpsft methods`` quotes, unsharded: each rank holds it whole until its first step cuts U_k and W0 to its
  rows), and a method's own (IW's reference model, OSF's frozen factors);
* **forward/backward peak** — the activations autograd keeps for one micro-batch (:func:`activation_bytes`), the
  LM head's tiles (TRL's fused head never builds the full logits), autocast's 16-bit weight copies, FSDP2's gathered
  layers, and the gradients too when several micro-batches accumulate;
* **optimizer-step peak** — the gradients, Adam's temporaries and the anchor's closed-form gradient.

The peak of a rank is the larger of the two phases: activations are freed by the end of the backward pass, when the
last gradients appear (with one micro-batch per step, the Trainer drops every gradient after the step).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("rpsft")

GiB = 2**30
# The plan may use this share of a device: the rest is the CUDA context, the caching allocator's fragmentation, NCCL's
# buffers and what the plan does not count (dataloader batches, small tensors).
HEADROOM = 0.9
# Shares of 16-bit weights an AdamW step cannot move (rounding_fraction) above which a run is refused / warned.
REFUSE_ROUNDING = 0.5
WARN_ROUNDING = 0.1
ADAPTER_METHODS = ("lora", "rpsft_lora", "osf")  # train adapters (fp32 in PEFT), not the stored base weights
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float64": 8}
MANTISSA_BITS = {"bfloat16": 7, "bf16": 7, "float16": 10, "fp16": 10}
UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
         "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


# ----------------------------------------------------------------------------------------------------- the launcher


@dataclass(frozen=True)
class Launcher:
    """How the run is launched, as far as memory goes (an accelerate config file, or the environment that
    ``accelerate launch`` sets)."""

    kind: str = "single"  # single | ddp | fsdp2 | fsdp1 | zero1 | zero2 | zero3
    world: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (the Trainer's train.bf16 turns bf16 on as well)
    activation_checkpointing: bool = False  # FSDP's own (fsdp_activation_checkpointing)
    offload_params: bool = False  # FSDP2 fsdp_offload_params: shards, gradients and optimizer state on the host
    offload_optimizer: bool = False  # ZeRO offload_optimizer_device != none
    cpu: bool = False  # processes on CPUs (their ranks share one machine's RAM)
    name: str = "one process"

    def describe(self) -> str:
        what = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2", "fsdp1": "FSDP v1", "zero1": "ZeRO-1",
                "zero2": "ZeRO-2", "zero3": "ZeRO-3"}[self.kind]
        if self.kind == "single":
            where = "one process on CPU" if self.cpu else "one GPU"
        else:
            where = f"{what} × {self.world} {'CPU processes' if self.cpu else 'GPUs'}"
        mp = f", {self.mixed_precision} mixed precision" if self.mixed_precision != "no" else ""
        return where + mp + (", offload" if self.offload_params or self.offload_optimizer else "")


def _true(v: Any) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def launcher_from_file(name: str | Path) -> Launcher:
    """A launcher from an accelerate config file: a shipped name (``fsdp2``, ``zero2``, ``ddp-cpu2``) or a path."""
    from .config import read_config_file
    from .launch import accelerate_config

    path = accelerate_config(str(name))  # one-line FileNotFoundError naming the shipped configs
    data = read_config_file(path, examples="configs/accelerate/", what="accelerate settings")
    dist = str(data.get("distributed_type", "NO")).upper()
    world = int(data.get("num_processes", 1) or 1)
    cpu = _true(data.get("use_cpu", False)) or dist == "MULTI_CPU"
    mp = str(data.get("mixed_precision", "no") or "no").lower()
    kw: dict[str, Any] = {}
    if dist == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        kind = "fsdp2" if str(fsdp.get("fsdp_version", 1)) == "2" else "fsdp1"
        kw = dict(activation_checkpointing=_true(fsdp.get("fsdp_activation_checkpointing", False)),
                  offload_params=_true(fsdp.get("fsdp_offload_params", False)))
    elif dist == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        kind = f"zero{int(ds.get('zero_stage', 2))}"
        kw = dict(offload_optimizer=str(ds.get("offload_optimizer_device", "none")).lower() not in ("none", ""))
    elif dist == "NO" or world <= 1:
        kind, world = "single", 1
    else:
        kind = "ddp"
    return Launcher(kind=kind, world=max(1, world), mixed_precision=mp, cpu=cpu, name=path.stem, **kw)


def launcher_from_env(env: dict | None = None) -> Launcher:
    """The launcher of the current process, from what ``accelerate launch`` put in its environment (one process
    without it)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    mp = str(env.get("ACCELERATE_MIXED_PRECISION", "no") or "no").lower()
    cpu = _true(env.get("ACCELERATE_USE_CPU", "false")) or not _cuda_available()
    if _true(env.get("ACCELERATE_USE_FSDP", "false")):
        kind = "fsdp2" if str(env.get("FSDP_VERSION", "1")) == "2" else "fsdp1"
        return Launcher(kind=kind, world=world, mixed_precision=mp, cpu=cpu, name="accelerate launch",
                        activation_checkpointing=_true(env.get("FSDP_ACTIVATION_CHECKPOINTING", "false")),
                        offload_params=_true(env.get("FSDP_OFFLOAD_PARAMS", "false")))
    if _true(env.get("ACCELERATE_USE_DEEPSPEED", "false")):
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
        off = str(env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")).lower() not in ("none", "")
        return Launcher(kind=f"zero{stage}", world=world, mixed_precision=mp, cpu=cpu, name="accelerate launch",
                        offload_optimizer=off)
    return Launcher(kind="ddp" if world > 1 else "single", world=world, mixed_precision=mp, cpu=cpu,
                    name="accelerate launch" if world > 1 else "one process")


def resolve_launcher(name: str | Path | None = None, gpus: int | None = None, gpu: bool = False) -> Launcher:
    """``--launcher NAME`` (else ``$ACCELERATE_CONFIG_FILE``, else this process's environment), with ``--gpus N`` as
    the number of processes of a multi-process launcher (one process keeps one; the others are only there for a
    suggestion). ``gpu``: plan for GPUs even where none is visible (``--gpu-memory`` was given)."""
    name = name or os.environ.get("ACCELERATE_CONFIG_FILE") or None
    launcher = launcher_from_file(name) if name else launcher_from_env()
    if gpus is not None:
        if gpus < 1:
            raise ValueError(f"--gpus {gpus}: give the number of GPUs, >= 1")
        if launcher.kind != "single":
            launcher = replace(launcher, world=gpus)
    if (gpu or gpus is not None) and launcher.cpu and not name:
        launcher = replace(launcher, cpu=False)  # a plan for GPUs, made on a machine without one
    return launcher


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


# ------------------------------------------------------------------------------------------------ device memory


def parse_bytes(text: str | int) -> int:
    """``80GiB`` / ``80G`` (2³⁰), ``80GB`` (10⁹), ``512MiB``, or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--gpu-memory {text!r}: give a size such as 80GiB, 80GB or 81920MiB")
    return int(float(m.group(1)) * UNITS[unit])


def host_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(launcher: Launcher, gpu_memory: str | int | None = None) -> tuple[int | None, str]:
    """(bytes one rank may hold, where that number comes from). ``--gpu-memory`` wins; else the visible GPU's memory,
    or, for processes on CPUs, the machine's RAM shared by its ranks; None for GPUs that are not visible here."""
    if gpu_memory is not None:
        return parse_bytes(gpu_memory), f"--gpu-memory {gpu_memory}"
    if launcher.cpu:
        ram = host_memory()
        return ram // max(1, launcher.world), (f"RAM {ram / GiB:.1f} GiB" +
                                               (f" / {launcher.world} ranks" if launcher.world > 1 else ""))
    if _cuda_available():
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(props.total_memory), f"{props.name}"
    return None, "no GPU visible here"


# -------------------------------------------------------------------------------------------------- model shapes


def shapes_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("rpsft") / "resources" / "model_shapes"))


def shipped_shape(name: str) -> Path | None:
    """The shipped config.json of a hub id (``Qwen/Qwen2.5-7B-Instruct`` → ``Qwen--Qwen2.5-7B-Instruct.json``) or of
    an embedded name, if there is one."""
    want = str(name).replace("/", "--").lower() + ".json"
    for p in shapes_dir().glob("*.json"):
        if p.name.lower() == want:
            return p
    return None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection (offline mode: no). Without this, transformers retries an
    unreachable hub for about 20 s before it gives up."""
    import socket
    from urllib.parse import urlparse

    if _true(os.environ.get("HF_HUB_OFFLINE", "0")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def model_config(name: str, trust_remote_code: bool = False):
    """(transformers config, where it came from: local | hub | shipped) of a model name, without any weights. A hub
    id is read from the hub (or its local cache); only when neither has it is a shipped shape used."""
    from transformers import AutoConfig

    from .models import EMBEDDED, cache_root, check_model_path

    key = str(name).lower()
    if key in EMBEDDED:
        local = cache_root() / "models" / key
        if (local / "config.json").is_file():
            return AutoConfig.from_pretrained(local), "local"
        return _config_from_json(shipped_shape(key)), "shipped"  # not converted yet: the same config.json fields
    resolved = check_model_path(name)  # one line for a missing or torn local directory
    if resolved is not None and Path(resolved).is_dir():
        return AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code), "local"
    try:
        online = hub_reachable()
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code,
                                          local_files_only=not online), "hub"
    except (OSError, ValueError) as e:  # offline and not cached, unreachable, gated, or not on the hub
        shipped = shipped_shape(name)
        if shipped is None:
            known = sorted(p.stem.replace("--", "/") for p in shapes_dir().glob("*.json"))
            raise FileNotFoundError(f"cannot read the config of {name} ({type(e).__name__}: the hub is unreachable "
                                    f"or has no such model) and no shape of it is shipped; pass a local checkpoint "
                                    f"directory as model.name (shipped shapes: {', '.join(known)})") from None
        return _config_from_json(shipped), "shipped"


@dataclass
class ModelShape:
    """What the plan needs of a model, read from a meta-device instance built from its config (no weights)."""

    name: str
    source: str  # local | hub | shipped
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    init_std: float
    params: list[tuple[str, tuple[int, ...]]]  # every parameter once (a tied weight under its first name)
    model: Any = field(default=None, repr=False)  # the meta model (for the anchor's matrix selection)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.params)

    def layer_params(self, index: int = 0) -> int:
        tag = f".layers.{index}."
        return sum(math.prod(s) for n, s in self.params if tag in n)

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, the final norm, an untied LM head."""
        return sum(math.prod(s) for n, s in self.params if not re.search(r"\.layers\.\d+\.", n))

    @property
    def layer_matrix_params(self) -> int:
        """2-D weights inside the decoder layers: what autocast copies to 16 bits."""
        return sum(math.prod(s) for n, s in self.params if len(s) == 2 and re.search(r"\.layers\.\d+\.", n))


def model_shape(name: str, trust_remote_code: bool = False, config=None, source: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of ``name`` (or of a given transformers ``config``), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    if config is None:
        config, source = model_config(name, trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    seen, params = set(), []
    for n, p in meta.named_parameters():  # named_parameters lists a tied weight once
        if id(p) not in seen:
            seen.add(id(p))
            params.append((n, tuple(p.shape)))
    return ModelShape(name=str(name), source=source or "given", model_type=str(text.model_type),
                      vocab=int(text.vocab_size), hidden=int(text.hidden_size),
                      intermediate=int(text.intermediate_size), layers=int(text.num_hidden_layers), heads=heads,
                      kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
                      tied=bool(getattr(text, "tie_word_embeddings", False)),
                      init_std=float(getattr(text, "initializer_range", None) or 0.02), params=params, model=meta)


# --------------------------------------------------------------------------------------------------- activations


def _head_tiles() -> tuple[int, int]:
    """(token rows, vocabulary columns) of one tile of TRL's fused LM head."""
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return int(TOKEN_CHUNK_SIZE), int(_CHUNKED_LOGPROB_CHUNK_SIZE)
    except ImportError:  # pragma: no cover - the values of TRL 1.16
        return 4096, 32768


def activation_bytes(shape: ModelShape, batch: int, seq: int, compute: int, residual: int, autocast: bool = False,
                     padded: bool = False, checkpointing: bool = False) -> dict:
    """Bytes autograd keeps for one micro-batch of ``batch`` × ``seq`` tokens through a Llama/Qwen decoder (SDPA
    attention, RMSNorm, SwiGLU), counted from what each op saves for its backward pass (docs/memory.md; tests check
    it against ``torch.autograd.graph.saved_tensors_hooks`` on tiny models).

    Per token and layer, with h hidden, kv = key/value width, i intermediate, H heads, c the compute dtype's bytes,
    r the residual stream's (4 under fp32 weights, autocast included; c when every weight is 16-bit):

    * each RMSNorm: its input in fp32 (4h), 1/rms (4), the normalised x (r·h);
    * the linear inputs: one per norm (2·c·h), or under autocast one cast copy per projection (q, k, v, gate,
      up: 5·c·h);
    * attention: q and k after RoPE, v, the output (c·(2h + 2kv)); SDPA's log-sum-exp (4·H); with padding
      transformers repeats k and v to every head (+ 2·c·(h − kv)) and SDPA keeps the mask as floats (batch·seq²·c
      per layer);
    * the MLP: gate, SiLU(gate), up, their product (4·c·i).

    fp32: 8h + 2kv + 4i + H + 2 numbers per token per layer. Gradient checkpointing keeps only each layer's input
    (r·h) plus one layer's activations while it is recomputed. Outside the layers: the final norm and the LM head's
    input copy, and RoPE's cos/sin."""
    h, i, H = shape.hidden, shape.intermediate, shape.heads
    kv = shape.kv_heads * shape.head_dim
    c, r = compute, residual
    tokens = batch * seq
    norm = 4 * h + 4 + r * h
    inputs = (5 if autocast else 2) * c * h
    attention = c * (2 * h + 2 * kv) + 4 * H + (2 * c * (h - kv) if padded and kv < h else 0)
    mlp = 4 * c * i
    per_token = 2 * norm + inputs + attention + mlp
    mask = batch * seq * seq * c if padded else 0
    layer = per_token * tokens + mask
    outside = (norm + r * h) * tokens + 2 * 4 * batch * seq * shape.head_dim  # final norm + head input; cos, sin
    if checkpointing:
        kept = shape.layers * r * h * tokens + layer  # every layer's input, and one layer being recomputed
    else:
        kept = shape.layers * layer
    return {"per_token_layer": per_token, "layer": layer, "total": kept + outside, "outside": outside}


def head_bytes(shape: ModelShape, tokens: int, compute: int, triton: bool) -> int:
    """Transient bytes of TRL's fused LM head (trl/kernels/chunked_logprob.py) in its backward pass: one tile of
    logits (min(tokens, 4096) × min(vocab, 32768)) in the compute dtype, the fp32 gradient of its input (tokens × h)
    and of its weight (vocab × h). Where Triton is missing (CPUs) the torch fallback holds 8¼ more fp32 tiles (y, z,
    log p, p, the gradient, the target mask as bool and as float, their difference and product; ``_backward_tile``)."""
    rows, cols = _head_tiles()
    tile = min(tokens, rows) * min(shape.vocab, cols)
    extra = 0 if triton else int(8.25 * tile * 4)
    return tile * compute + extra + tokens * shape.hidden * 4 + shape.vocab * shape.hidden * 4


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass
class Row:
    name: str
    bytes: int
    phase: str  # always | fwd/bwd | step
    note: str = ""


@dataclass
class MemoryPlan:
    model: str
    source: str
    method: str
    launcher: Launcher
    batch: int
    seq: int
    grad_accum: int
    checkpointing: bool
    compute: str
    rows: list[Row]
    forward_peak: int
    step_peak: int
    memory: int | None
    memory_source: str
    host_at_load: int
    rounding: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.step_peak)

    @property
    def usable(self) -> int | None:
        return None if self.memory is None else int(self.memory * HEADROOM)

    @property
    def fits(self) -> bool | None:
        return None if self.memory is None else self.peak <= self.usable

    def bytes_of(self, name: str) -> int:
        return sum(r.bytes for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["launcher"]["describe"] = self.launcher.describe()
        d.update(peak=self.peak, usable=self.usable, fits=self.fits)
        return d


def _optimizer_states(optim: str) -> tuple[int, str]:
    """(states per trainable weight, note) of a Trainer ``optim`` name."""
    o = optim.lower()
    if o.startswith("sgd"):
        return 0, "SGD without momentum keeps no state"
    if "lion" in o:
        return 1, ""
    if "adafactor" in o:
        return 0, "Adafactor's factored state is not counted (≈ rows + columns per matrix)"
    if o.startswith("adam") or "adamw" in o:
        return 2, ""
    return 2, f"optimizer {optim!r}: planned as two states per weight, like AdamW"


def _shard(numel_shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter: dim 0 split into ceil(dim0 / world) rows (torch.chunk,
    padded to that size on every rank)."""
    if world <= 1 or not numel_shape:
        return math.prod(numel_shape) if numel_shape else 1
    rows = -(-numel_shape[0] // world)
    return rows * math.prod(numel_shape[1:])


def _anchor_plan(cfg, shape: ModelShape, method, sharded_rows: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(anchor bytes, the largest anchored matrix's local elements, [(m, n, k)]) through rpsft.frames.anchor_nbytes —
    the formula ``rpsft methods`` quotes — on the selected matrices at their resolved k."""
    import torch

    from .frames import anchor_nbytes, parse_frame_dtype
    from .models import parse_dtype
    from .selection import candidate_matrices, resolve_ranks, select_matrices

    a = cfg.anchor
    full = method.anchor == "full"
    matrices = select_matrices(shape.model, a.targets, a.layers)
    ranks = resolve_ranks([(n, tuple(p.shape)) for n, p in matrices], 1.0 if full else a.rank,
                          known=[n for n, _ in candidate_matrices(shape.model)])
    frame = parse_frame_dtype(a.frame_dtype)
    rule = "l2" if full else a.full_rank
    wide = 2 if parse_dtype(a.dtype) == torch.float64 else 1  # float64 bases: every fp32 tensor of the formula twice
    total, largest, mnk = 0, 0, []
    for n, p in matrices:
        m, nn = tuple(p.shape)
        k = ranks[n]
        b = anchor_nbytes([(m, nn)], k, frame, full_rank_as=rule, form=method.anchor_form)
        if method.name == "rpsft_lora" and k >= min(m, nn) and (rule == "l2" or m == nn):
            b = 0  # ‖s·BA‖²: W0 is LoRA's frozen base, nothing is stored
        total += b * wide
        if k:
            mnk.append((m, nn, k))
            largest = max(largest, -(-m // sharded_rows) * nn)
    return total, largest, mnk


def _adapter_numbers(cfg, shape: ModelShape, method) -> tuple[int, int, int]:
    """(trainable adapter numbers, frozen extra numbers, the largest trainable tensor) of an adapter method."""
    from .selection import select_matrices

    if method.name == "osf":
        k_spec = cfg.osf.effective_rank
        trainable = frozen = largest = 0
        for _, p in select_matrices(shape.model, cfg.osf.targets, None):
            m, n = tuple(p.shape)
            d = min(m, n)
            k = d // 2 if k_spec in (None, "none", "null") else (
                max(1, round(float(k_spec) * d)) if isinstance(k_spec, float) and k_spec <= 1 else min(int(k_spec), d))
            low = (m + n + 1) * (d - k)
            trainable += low
            largest = max(largest, max(m, n) * (d - k))
            frozen += low + (max(m, n) * k if m != n else 0)  # the init copy (merge delta), U_h or V_h
        return trainable, frozen, largest
    r = cfg.lora.r
    adapted = [tuple(p.shape) for _, p in select_matrices(shape.model, cfg.lora.targets, None)]
    return sum(r * (m + n) for m, n in adapted), 0, max(r * max(m, n) for m, n in adapted)


def plan_memory(cfg, launcher: Launcher | None = None, memory: int | None = None, memory_source: str = "",
                shape: ModelShape | None = None) -> MemoryPlan:
    """The per-rank memory plan of training ``cfg`` under ``launcher`` (default: this process's), against ``memory``
    bytes per rank (None: report without a verdict)."""
    from .methods import get_method

    launcher = launcher or launcher_from_env()
    if launcher.kind in ("fsdp1", "zero3"):
        what = "FSDP v1's flat parameters" if launcher.kind == "fsdp1" else "ZeRO-3's partitioned weights"
        raise ValueError(f"launcher {launcher.name} ({launcher.describe()}): {what} break the anchor's per-matrix "
                         "view and rpsft train refuses it; plan with --launcher fsdp2 (or zero2)")
    method = get_method(cfg.method)
    shape = shape or model_shape(cfg.model.name, cfg.model.trust_remote_code)
    t = cfg.train
    gpu = not launcher.cpu
    w = launcher.world
    kind = launcher.kind
    notes: list[str] = []

    # precision: the Trainer's bf16 flag (None: on a GPU; the trainer: section has the last word) turns on bf16
    # mixed precision, else the launcher's
    section = cfg.trainer or {}
    bf16 = bool(section.get("bf16", t.bf16 if t.bf16 is not None else gpu))
    mp = "fp16" if section.get("fp16") else "bf16" if bf16 else launcher.mixed_precision
    md = DTYPE_BYTES[str(cfg.model.dtype).lower()]
    zero = kind.startswith("zero")
    fsdp = kind == "fsdp2"
    if fsdp and mp != "no":
        wt = 4  # accelerate upcasts FSDP2's trainable shards to fp32; MixedPrecisionPolicy casts them for compute
    elif zero and mp != "no":
        wt = 2  # DeepSpeed casts the module to 16 bits; the fp32 masters live in its optimizer
    else:
        wt = md
    pure16 = (fsdp or zero) and mp != "no" or md == 2
    autocast = mp != "no" and not pure16
    compute = 2 if (mp != "no" or md == 2) else md
    residual = compute if pure16 else md  # the residual stream: fp32 under fp32 weights, autocast included
    compute_txt = ("bf16 autocast over fp32 weights" if autocast else
                   f"{'16-bit' if compute == 2 else f'{8 * compute}-bit'} compute, "
                   f"{'fp32' if wt == 4 else 'bf16' if wt == 2 else f'{8 * wt}-bit'} weights")

    # gradient checkpointing: the config (None: on for a GPU), FSDP's own when its config turns it on
    gc = t.gradient_checkpointing if t.gradient_checkpointing is not None else gpu
    gc = section.get("activation_checkpointing", section.get("gradient_checkpointing", gc))
    ckpt = bool(gc) or (fsdp and launcher.activation_checkpointing)

    # parameters: trainable and frozen numbers, each rank's share
    shard_w = w if fsdp else 1
    P = shape.n_params
    adapter = method.name in ADAPTER_METHODS
    if adapter:
        trainable, frozen_extra, largest = _adapter_numbers(cfg, shape, method)
        base_local = sum(_shard(s, shard_w) for _, s in shape.params)
        weights = base_local * md + (trainable + frozen_extra) * 4 // shard_w  # adapters in fp32 (PEFT's autocast)
        t_local, t_bytes = -(-trainable // shard_w), 4
    else:
        t_local = sum(_shard(s, shard_w) for _, s in shape.params)
        t_bytes = wt
        weights = t_local * wt
        largest = max(math.prod(s) for _, s in shape.params)
    rows: list[Row] = []
    where_weights = "host" if fsdp and launcher.offload_params else "always"

    def add(name: str, nbytes: int, phase: str, note: str = "") -> None:
        if nbytes:
            rows.append(Row(name, int(nbytes), phase, note))

    per = f" / {w}" if fsdp and w > 1 else ""
    count = f"{P / 1e9:.3g}B" if P >= 1e9 else f"{P / 1e6:.3g}M"
    add("weights", weights, where_weights, f"{count} params{per}"
        + (f", fp32 adapters, {_bits(md)} base" if adapter else f", {_bits(wt)}"))

    states, onote = _optimizer_states(t.optim)
    if onote:
        notes.append(onote)
    zero_share = w if zero else 1
    if zero:
        grads = (t_local * (2 if mp != "no" else 4)) // (w if kind == "zero2" else 1)
        opt = t_local * states * 4 // w
        master = t_local * 4 // w if mp != "no" else 0
    else:
        grads = t_local * t_bytes
        opt = t_local * states * t_bytes
        master = 0
    off_opt = (fsdp and launcher.offload_params) or (zero and launcher.offload_optimizer)
    add("optimizer state", opt, "host" if off_opt else "always",
        f"{states} × {'fp32' if zero else _bits(t_bytes)} per trained weight"
        + (f" / {zero_share if zero else w}" if (zero or fsdp) and w > 1 else ""))
    add("fp32 master weights", master, "host" if off_opt else "always", f"ZeRO's / {w}")
    if kind == "ddp" and w > 1:
        add("DDP gradient buckets", t_local * t_bytes, "always", "a second copy of the gradients")

    # the anchor, through the formula rpsft methods quotes
    use_anchor = method.anchor_enabled(cfg.anchor.enabled)
    if use_anchor:
        nbytes, largest_anchored, mnk = _anchor_plan(cfg, shape, method, shard_w)
        add("anchor", nbytes, "always", f"{len(mnk)} matrices" + (", whole (upper bound)" if fsdp and w > 1 else ""))
        if zero:
            # the autograd penalty of the last micro-batch: W·V_k (m × k) and A per matrix stay in its graph
            add("anchor penalty graph", sum(m * k * 4 + k * k * 4 for m, n, k in mnk), "fwd/bwd", "λR in the loss")
        else:
            # U_k A V_kᵀ and W − W0 of the largest matrix (this rank's rows), fp32
            add("anchor gradient", 2 * largest_anchored * 4, "step", "closed form, one matrix at a time")

    # a method's own
    if method.name == "iw":
        ref = (P * md // w) if fsdp else (P * 2 if zero and mp != "no" else P * md)
        add("IW reference model", ref, "always", f"frozen initial model{per}")

    # forward/backward transients of one micro-batch
    padded = t.batch_size > 1
    act = activation_bytes(shape, t.batch_size, cfg.data.max_length, compute, residual, autocast, padded, ckpt)
    add("activations", act["total"], "fwd/bwd", f"{t.batch_size} × {cfg.data.max_length} tokens"
        + (", checkpointed" if ckpt else ""))
    tokens = t.batch_size * (cfg.data.max_length - 1)
    add("LM head", head_bytes(shape, tokens, compute, triton=gpu), "fwd/bwd",
        "one logits tile" + ("" if gpu else " + torch fallback's"))
    if autocast:
        add("autocast weight copies", shape.layer_matrix_params * 2, "fwd/bwd", "16-bit, cached until backward")
    if fsdp:
        lp = shape.layer_params(0)
        gathered = (2 * lp + shape.root_params) * compute + 2 * lp * (compute if mp != "no" else 4)
        add("FSDP2 gathered layers", gathered, "fwd/bwd", "2 layers + root, 1 layer's gradient")
    if zero:
        add("ZeRO reduce bucket", int(5e8) * (2 if mp != "no" else 4), "fwd/bwd", "5e8 elements (its default)")
    where_grads = "host" if fsdp and launcher.offload_params else "step"
    add("gradients", grads, where_grads, _bits(2 if zero and mp != "no" else t_bytes)
        + (f" / {w}" if (fsdp or kind == "zero2") and w > 1 else "")
        + (", held while accumulating" if t.grad_accum > 1 else ""))
    fused = "fused" in t.optim.lower()  # adamw_torch_fused: one kernel per tensor, no temporary state copy
    if gpu:
        adam_tmp = t_local * t_bytes if states == 2 and not zero and not fused else 0  # foreach: √v of every state
    else:
        # one weight at a time: √v and √v / √(1 − β₂ᵗ) of the largest weight (torch.optim.adam._single_tensor_adam)
        adam_tmp = 2 * -(-largest // shard_w) * t_bytes if states == 2 and not fused else 0
    if zero:
        adam_tmp = t_local * 4 // w  # the fp32 gradient partition the optimizer steps with
    add("optimizer temporaries", adam_tmp, "host" if off_opt else "step",
        "foreach: √v of every weight" if gpu and not zero else
        "fp32 gradient partition" if zero else "√v of the largest weight")

    persistent = sum(r.bytes for r in rows if r.phase == "always")
    fwd = sum(r.bytes for r in rows if r.phase == "fwd/bwd")
    step = sum(r.bytes for r in rows if r.phase == "step")
    grads_on_device = grads if where_grads != "host" else 0
    forward_peak = persistent + fwd + (grads_on_device if t.grad_accum > 1 else 0)
    step_peak = persistent + step

    host_at_load = w * (P * md + rows_bytes(rows, "anchor"))  # one node: every rank loads, then shards
    # the trained weights' own storage: fp32 adapters, ZeRO's fp32 masters, or the weights themselves
    rounding = rounding_check(cfg, shape, 4 if adapter or (zero and mp != "no") else wt)
    return MemoryPlan(model=shape.name, source=shape.source, method=cfg.method, launcher=launcher,
                      batch=t.batch_size, seq=cfg.data.max_length, grad_accum=t.grad_accum, checkpointing=ckpt,
                      compute=compute_txt, rows=rows, forward_peak=forward_peak, step_peak=step_peak, memory=memory,
                      memory_source=memory_source, host_at_load=host_at_load, rounding=rounding, notes=notes)


def _bits(nbytes: int) -> str:
    return {2: "16-bit", 4: "fp32", 8: "fp64"}.get(nbytes, f"{8 * nbytes}-bit")


def rows_bytes(rows: list[Row], name: str) -> int:
    return sum(r.bytes for r in rows if r.name == name)


# ------------------------------------------------------------------------------------- 16-bit weights, small steps


def rounding_fraction(lr: float, std: float, dtype: str = "bfloat16") -> tuple[float, float]:
    """(share of N(0, std²) weights an update of size ``lr`` cannot move in ``dtype``, the |w| above which it cannot).

    Round-to-nearest drops an update smaller than half the spacing 2^(e − p) of a weight in [2^e, 2^(e+1)) (p: the
    stored mantissa bits, 7 for bf16, 10 for fp16): lr < 2^(e − p − 1) ⇔ e ≥ ⌊log2 lr⌋ + p + 2, i.e. every
    |w| ≥ t = 2^(⌊log2 lr⌋ + p + 2). AdamW's step is ≈ lr per weight (exactly lr·sign(g) at step 1, |m̂/√v̂| ≤ 1
    after), so P(|w| ≥ t) = erfc(t / (std·√2)) of the weights never change."""
    p = MANTISSA_BITS[str(dtype).lower()]
    t = 2.0 ** (math.floor(math.log2(lr)) + p + 2)
    return math.erfc(t / (std * math.sqrt(2))), t


def rounding_check(cfg, shape: ModelShape, stored_bytes: int) -> dict | None:
    """The rounding verdict when the trained weights are stored in 16 bits with no fp32 copy (None otherwise)."""
    dtype = str(cfg.model.dtype).lower()
    if stored_bytes != 2 or dtype not in MANTISSA_BITS or cfg.method in ADAPTER_METHODS:
        return None  # fp32 weights, ZeRO's fp32 masters, FSDP2's fp32 shards, or fp32 adapters over a frozen base
    frac, t = rounding_fraction(cfg.train.lr, shape.init_std, dtype)
    return {"fraction": frac, "threshold": t, "dtype": dtype, "lr": cfg.train.lr, "std": shape.init_std}


def rounding_message(r: dict) -> str:
    name = "bf16" if r["dtype"] in ("bfloat16", "bf16") else "fp16"
    return (f"model.dtype={r['dtype']} keeps the trained weights in {name} with no fp32 copy: at lr {r['lr']:g} an "
            f"AdamW step (≈ lr) is below half of {name}'s spacing for {100 * r['fraction']:.1f} % of them (every "
            f"|w| ≥ {r['threshold']:.2g}; init std {r['std']:g}), so they would never change; set "
            "model.dtype=float32 with mixed precision (train.bf16=true, or --launcher fsdp2: fp32 sharded weights, "
            "bf16 compute)")


# ------------------------------------------------------------------------------------------ refusal and suggestions


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def fitting_setting(cfg, plan: MemoryPlan, gpus: int, shape: ModelShape) -> tuple[list[str], MemoryPlan]:
    """The first of these, applied one after another, with which the plan fits: FSDP2 sharding over the ``gpus``
    GPUs, gradient checkpointing, a smaller per-device batch (the same global batch through more accumulation), bf16
    frames. A step that does not lower the peak is dropped (more accumulation keeps the gradients through the
    forward pass, which can cost more than the activations it saves). Returns (the settings, the plan with them), or
    ([], the smallest plan found) when none fits."""
    from .launch import accelerate_configs
    from .methods import get_method

    best, best_cfg, best_launcher, steps = plan, copy.deepcopy(cfg), plan.launcher, []

    def attempt(label: str, change) -> bool:
        nonlocal best, best_cfg, best_launcher, steps
        c, lnch = copy.deepcopy(best_cfg), best_launcher
        lnch = change(c, lnch)
        p = plan_memory(c, lnch, plan.memory, plan.memory_source, shape)
        if p.peak < best.peak:
            best, best_cfg, best_launcher = p, c, lnch
            steps = [s for s in steps if s.split("=")[0] != label.split("=")[0]] + [label]
        return bool(best.fits)

    lnch0 = plan.launcher
    if gpus > 1 and not lnch0.cpu and (lnch0.kind != "fsdp2" or lnch0.world < gpus):
        shipped = accelerate_configs().get("fsdp2")
        base = launcher_from_file(shipped) if shipped is not None else Launcher(kind="fsdp2", mixed_precision="bf16")
        if attempt(f"FSDP2 over {gpus} GPUs (rpsft launch fsdp2 train ..., num_processes {gpus}: fp32 sharded "
                   "weights, bf16 compute)", lambda c, lnch: replace(base, world=gpus)):
            return steps, best
    if not best.checkpointing:
        def checkpointing(c, lnch):
            c.train.gradient_checkpointing = True
            return lnch

        if attempt("train.gradient_checkpointing=true", checkpointing):
            return steps, best
    batch = best_cfg.train.batch_size
    while batch > 1:
        batch //= 2

        def smaller(c, lnch, b=batch):
            c.train.grad_accum = c.train.grad_accum * c.train.batch_size // b
            c.train.batch_size = b
            return lnch

        if attempt(f"train.batch_size={batch} train.grad_accum="
                   f"{best_cfg.train.grad_accum * best_cfg.train.batch_size // batch}", smaller):
            return steps, best
    method = get_method(cfg.method)
    if method.anchor_enabled(cfg.anchor.enabled) and method.anchor_form == "block" \
            and str(cfg.anchor.frame_dtype).lower() in ("fp32", "float32"):
        def lean(c, lnch):
            c.anchor.frame_dtype = "bf16"
            return lnch

        if attempt("anchor.frame_dtype=bf16", lean):
            return steps, best
    return [], best


def refusal(cfg, plan: MemoryPlan, gpus: int, shape: ModelShape) -> str | None:
    """The one-line refusal of a plan that does not fit (None when it fits or the device memory is unknown)."""
    if plan.fits is not False:
        return None
    top = sorted(plan.rows, key=lambda r: -r.bytes)[:3]
    need = (f"the memory plan needs {_gib(plan.peak)} per rank ({', '.join(f'{r.name} {_gib(r.bytes)}' for r in top)}"
            f") but {plan.memory_source} leaves {_gib(plan.usable)} usable of {_gib(plan.memory)}")
    steps, best = fitting_setting(cfg, plan, gpus, shape)
    if steps:
        return f"{need}; it fits with {' + '.join(steps)}: {_gib(best.peak)} per rank (see `rpsft plan`)"
    tried = (f"FSDP2 over {gpus} GPUs, " if gpus > 1 and not plan.launcher.cpu else "") + \
        "gradient checkpointing, a smaller batch, bf16 frames"
    return (f"{need}; nothing tried fits ({tried}: at best {_gib(best.peak)}); use more GPUs or GPUs with more "
            "memory, or lower data.max_length / anchor.rank")


def check_plan(cfg, plan: MemoryPlan, gpus: int, shape: ModelShape) -> list[str]:
    """Refuse (ValueError, one line) a plan whose 16-bit weights would not train, or that cannot fit; return the
    warnings (also logged)."""
    warn = []
    r = plan.rounding
    if r is not None and r["fraction"] >= REFUSE_ROUNDING:
        raise ValueError(rounding_message(r))
    if r is not None and r["fraction"] >= WARN_ROUNDING:
        warn.append(rounding_message(r).replace("so they would never change; set", "so they would not change; "
                                                                                  "consider"))
    msg = refusal(cfg, plan, gpus, shape)
    if msg is not None:
        raise ValueError(msg)
    for w in warn:
        log.warning(w)
    return warn


# ---------------------------------------------------------------------------------------------------- rendering


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 4 else f"{n / 2**20:.1f} MiB"


def plan_table(plan: MemoryPlan):
    """The plan as a rich table (the project's table style: numbers right-aligned and never wrapped)."""
    from rich.table import Table

    src = {"shipped": ", shapes shipped with rpsft", "hub": ", config from the hub", "local": ""}.get(plan.source, "")
    acc = f" × {plan.grad_accum} accumulated" if plan.grad_accum > 1 else ""
    title = (f"memory plan: {plan.model} · method={plan.method} · {plan.launcher.describe()} · "
             f"{plan.batch} × {plan.seq} tokens{acc} · {plan.compute}{', checkpointing' if plan.checkpointing else ''}"
             f"{src}")
    t = Table(title=title)
    t.add_column("per rank", overflow="fold")
    t.add_column("bytes", justify="right", no_wrap=True)
    t.add_column("when", no_wrap=True)
    t.add_column("what", overflow="fold")
    for r in plan.rows:
        t.add_row(r.name, _size(r.bytes), {"always": "held", "fwd/bwd": "fwd/bwd", "step": "step",
                                           "host": "host RAM"}[r.phase], r.note)
    t.add_section()
    t.add_row("forward/backward peak", _size(plan.forward_peak), "", "held + fwd/bwd"
              + (" + gradients" if plan.grad_accum > 1 else ""))
    t.add_row("optimizer-step peak", _size(plan.step_peak), "", "held + step")
    verdict = ("device memory unknown: pass --gpu-memory 80GiB" if plan.memory is None else
               f"{'fits' if plan.fits else 'does NOT fit'} in {_size(plan.usable)} ({int(HEADROOM * 100)} % of "
               f"{_size(plan.memory)})")
    t.add_row("[bold]peak[/bold]", f"[bold]{_size(plan.peak)}[/bold]", "", verdict)
    t.add_row("host RAM at load", _size(plan.host_at_load), "", "each rank loads all, then shards")
    return t


def plan_lines(plan: MemoryPlan) -> list[str]:
    """The plan as plain lines, for a log file."""
    out = [f"memory plan: {plan.model} method={plan.method} {plan.launcher.describe()} {plan.batch}x{plan.seq} "
           f"tokens, {plan.compute}{', checkpointing' if plan.checkpointing else ''}"]
    out += [f"  {r.name:28s} {_size(r.bytes):>11s}  {r.phase:8s} {r.note}" for r in plan.rows]
    out.append(f"  peak {_size(plan.peak)} per rank (fwd/bwd {_size(plan.forward_peak)}, step "
               f"{_size(plan.step_peak)}); device {_size(plan.memory) if plan.memory else '?'} ({plan.memory_source})")
    return out


def print_plan(plan: MemoryPlan, console=None) -> None:
    from rich.console import Console

    con = console or Console()
    con.print(plan_table(plan))
    if plan.rounding is not None:
        r = plan.rounding
        con.print(f"16-bit weights at lr {r['lr']:g}: {100 * r['fraction']:.1f} % of them cannot move (an AdamW step "
                  f"≈ lr is below half their spacing for |w| ≥ {r['threshold']:.2g}, init std {r['std']:g})",
                  highlight=False)
    for n in plan.notes:
        con.print(f"note: {n}", highlight=False)


# ------------------------------------------------------------------------------------------------ the two entries


def visible_gpus() -> int:
    if _cuda_available():
        import torch

        return torch.cuda.device_count()
    return 0


def make_plan(cfg, launcher: str | Path | None = None, gpus: int | None = None,
              gpu_memory: str | int | None = None) -> tuple[MemoryPlan, ModelShape, int]:
    """``rpsft plan``: (the plan, the model's shape, the GPUs a suggestion may use)."""
    lnch = resolve_launcher(launcher, gpus, gpu=gpu_memory is not None)
    memory, source = device_memory(lnch, gpu_memory)
    shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
    plan = plan_memory(cfg, lnch, memory, source, shape)
    n_gpus = gpus or max(lnch.world, visible_gpus(), 1)
    return plan, shape, n_gpus


def plan_for_training(cfg, console=None) -> MemoryPlan | None:
    """``rpsft train``, before anything loads: the plan of this process's launch, printed on rank 0 (and logged);
    refuses (ValueError) a run that cannot fit or whose 16-bit weights would not move. A model whose config cannot
    be read without loading it (an unknown architecture) is trained without a plan, with a warning."""
    launcher = launcher_from_env()
    try:
        shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
        memory, source = device_memory(launcher)
        plan = plan_memory(cfg, launcher, memory, source, shape)
    except Exception as e:  # noqa: BLE001 - a plan we cannot make must not stop a run the model can make
        log.warning("memory plan skipped: %s: %s", type(e).__name__, e)
        return None
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for line in plan_lines(plan):
            log.info(line)
        if console is not None:
            print_plan(plan, console)
    check_plan(cfg, plan, max(visible_gpus(), launcher.world, 1), shape)
    return plan
