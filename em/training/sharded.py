"""Sharded training with adapters: DeepSpeed ZeRO-2/3 (+offload) and FSDP.

What this module adds on top of Lightning's strategies:

* :func:`build_model` builds the (PEFT) model inside ``configure_model`` so that it works under every
  strategy: under ZeRO-3 transformers loads the pretrained weights straight into partitioned parameters
  and the LoRA layers are created outside ``deepspeed.zero.Init`` (see the function).
* :func:`gather_state` returns the full tensors of the trainable parameters (or of all of them) whatever
  the sharding: ``deepspeed.zero.GatheredParameters`` under ZeRO-3, ``summon_full_params`` per FSDP unit
  under FSDP, a plain copy otherwise. It is a collective: every rank must call it.
* :class:`AdapterFSDPStrategy`: FSDP that wraps decoder layers and every trainable leaf module as its own
  unit (so fp32 LoRA weights can sit next to a bf16 base), writes adapter-only checkpoints, clips gradients
  by norm through the root FSDP module, and also runs on CPU processes (gloo) for tests.
* :class:`EMDeepSpeedStrategy`: Lightning's DeepSpeed strategy plus ``extra_config`` (keys merged into the
  generated DeepSpeed config); :class:`CPUDeepSpeedStrategy` runs it on CPU processes (gloo) for tests.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from torch import nn

from em.errors import ConfigError
from em.models.loading import checkpointing_enabled, load_model
from em.models.peft_setup import apply_finetune
from em.utils.dist import is_global_zero

log = logging.getLogger(__name__)

#: Prefixes that wrappers insert into parameter names (FSDP units, activation checkpointing, torch.compile).
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: Elements gathered at once under ZeRO-3 when saving (bounds the transient GPU memory of a full-model save).
GATHER_CHUNK_NUMEL = 200_000_000


def clean_name(name: str) -> str:
    """A parameter name without the wrapper prefixes FSDP / checkpoint wrappers / torch.compile insert."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def trainable_param_names(model: nn.Module) -> list[str]:
    """Clean names of the parameters that require grad (identical with and without FSDP wrapping)."""
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


# -- what kind of strategy ----------------------------------------------------------------------------

def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy, else None."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    cfg = strategy.config if isinstance(getattr(strategy, "config", None), dict) else {}
    zero = cfg.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if zero else 0


def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, FSDPStrategy)


def zero3_reentrant_checkpointing_needed() -> bool:
    """Whether the installed DeepSpeed needs reentrant activation checkpointing for frozen params under ZeRO-3.

    Non-reentrant checkpointing (transformers' default) + ZeRO-3 + frozen parameters (LoRA) crashes in
    backward with ``CheckpointError: Recomputed values ... saved {'shape': [1024]} vs recomputed {'shape': [0]}``
    because ZeRO-3 re-partitions the frozen weights before the recompute:
    https://github.com/deepspeedai/DeepSpeed/issues/4332, https://github.com/huggingface/transformers/issues/47254
    (TRL forces ``use_reentrant=True`` for it: https://github.com/huggingface/trl/pull/4951). DeepSpeed fixed it in
    https://github.com/deepspeedai/DeepSpeed/pull/8148 (``update_recompute_parameters`` in the param coordinator);
    once em requires a DeepSpeed with that fix, this check and the reentrant switch can go.
    """
    try:
        from deepspeed.runtime.zero import partitioned_param_coordinator as ppc
    except ImportError:  # pragma: no cover - only called with deepspeed in use
        return False
    return not hasattr(ppc, "update_recompute_parameters")


@contextlib.contextmanager
def _hf_zero3_loading(strategy: Any) -> Iterator[None]:
    """Let ``from_pretrained`` load weights into ZeRO-3 partitions (transformers' non-Trainer integration).

    Lightning creates ``configure_model``'s modules inside ``deepspeed.zero.Init``; transformers only loads a
    checkpoint into partitioned parameters (gathering each module's weights, rank 0 copying) when an
    ``HfDeepSpeedConfig`` is alive (transformers docs, "Non-Trainer DeepSpeed integration":
    https://huggingface.co/docs/transformers/main/en/deepspeed#non-trainer-deepspeed-integration).
    The global is unset afterwards, so a later run in the same process (a sweep) is not mistaken for ZeRO-3.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(strategy.config)  # transformers holds a weakref to it: keep it alive meanwhile
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds


@contextlib.contextmanager
def _zero_init_paused() -> Iterator[None]:
    """Create modules as ordinary full tensors inside an active ``deepspeed.zero.Init``.

    PEFT initialises LoRA weights (``lora_B`` to zero) after constructing each ``nn.Linear``; under
    ``zero.Init`` the Linear is partitioned on construction, so that init would write into an empty tensor and
    ``lora_B`` would keep nn.Linear's random init. Created outside, the adapters are regular tensors that
    ``deepspeed.initialize`` partitions (broadcast from rank 0) like any non-ZeRO parameter.
    """
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def build_model(model_args, finetune_args, model_path: str | None, strategy: Any = None) -> nn.Module:
    """Load the base model and apply the finetune (LoRA or full) in a way that suits ``strategy``.

    Called from ``CausalLMModule.configure_model`` (inside the strategy's ``model_sharded_context``).
    """
    stage = zero_stage(strategy)
    if stage != 3:
        base = load_model(model_args, model_path)
        return apply_finetune(base, finetune_args)
    with _hf_zero3_loading(strategy):
        base = load_model(model_args, model_path)
        if checkpointing_enabled(base) and finetune_args.kind != "full" \
                and zero3_reentrant_checkpointing_needed():
            # Workaround for https://github.com/deepspeedai/DeepSpeed/issues/4332 (see the function above);
            # apply_finetune then makes the embedding outputs require grad, which reentrant checkpointing needs.
            log.info("ZeRO-3 + LoRA + gradient checkpointing: using reentrant checkpointing (DeepSpeed#4332)")
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with _zero_init_paused():
            return apply_finetune(base, finetune_args)


# -- gathering full tensors ----------------------------------------------------------------------------

def _chunks(named: list[tuple[str, nn.Parameter]], max_numel: int) -> Iterator[list[tuple[str, nn.Parameter]]]:
    chunk: list[tuple[str, nn.Parameter]] = []
    size = 0
    for n, p in named:
        numel = int(getattr(p, "ds_numel", p.numel()))
        if chunk and size + numel > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append((n, p))
        size += numel
    if chunk:
        yield chunk


def _gather_zero3(root: nn.Module, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor]:
    import deepspeed

    named = [(clean_name(n), p) for n, p in root.named_parameters() if p.requires_grad or not trainable_only]
    out: dict[str, torch.Tensor] = {}
    for chunk in _chunks(named, GATHER_CHUNK_NUMEL):
        # modifier_rank=None: read-only gather on every rank (a collective; never call it on rank 0 only)
        with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
            if keep:
                for n, p in chunk:
                    out[n] = p.detach().to("cpu", copy=True)
    return out


def _fsdp_owned_params(fsdp_root: nn.Module, target: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each FSDP unit (by id): the (clean name relative to ``target``, owner module, attribute) it shards.

    A parameter belongs to the innermost FSDP unit above its module. Names are relative to ``target`` (the
    LightningModule or the model) so they match un-sharded ``named_parameters`` names.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    prefix = None
    for name, m in fsdp_root.named_modules():
        if m is target:
            prefix = clean_name(name + ".") if name else ""
            break
    if prefix is None:
        raise ValueError("target module is not inside the FSDP root")
    owned: dict[int, list[tuple[str, nn.Module, str]]] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, path: str, unit: nn.Module | None) -> None:
        if isinstance(module, FSDP):
            unit = module
        for attr, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            full = clean_name(f"{path}{attr}")
            if unit is not None and full.startswith(prefix):
                owned.setdefault(id(unit), []).append((full[len(prefix):], module, attr))
        for child_name, child in module._modules.items():
            if child is not None:
                walk(child, f"{path}{child_name}.", unit)

    walk(fsdp_root, "", None)
    return owned


def _gather_fsdp(fsdp_root: nn.Module, target: nn.Module, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor]:
    """Summon each FSDP unit's full parameters in turn (``recurse=False``) and copy the wanted ones.

    One unit at a time bounds the memory to the largest unit; with em's wrap policy every LoRA layer is its
    own unit, so an adapter save gathers the adapter and nothing of the frozen base.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owned = _fsdp_owned_params(fsdp_root, target)
    out: dict[str, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(fsdp_root):  # same order on every rank
        wanted = [(n, m, a) for n, m, a in owned.get(id(unit), [])
                  if m._parameters[a].requires_grad or not trainable_only]
        if not wanted:  # requires_grad is the same on every rank, so every rank skips the same units
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            if keep:
                for n, m, a in wanted:
                    out[n] = getattr(m, a).detach().to("cpu", copy=True)
    return out


def gather_state(module: nn.Module, strategy: Any = None, *, trainable_only: bool = True,
                 rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU tensors of ``module``'s parameters (trainable ones only by default), by clean name.

    A collective under ZeRO-3 and FSDP: call it on every rank. With ``rank0_only`` the other ranks take part
    in the gather but return an empty dict (for a full model: one CPU copy, on rank 0).
    """
    keep = not rank0_only or is_global_zero(strategy)
    stage = zero_stage(strategy)
    if stage == 3:
        return _gather_zero3(module, trainable_only, keep)
    if is_fsdp(strategy) and strategy.model is not None and strategy.model is not module:
        return _gather_fsdp(strategy.model, module, trainable_only, keep)
    if not keep:
        return {}
    return {clean_name(n): p.detach().to("cpu", copy=True) for n, p in module.named_parameters()
            if p.requires_grad or not trainable_only}


# -- FSDP ------------------------------------------------------------------------------------------------

def fsdp_wrap_policy(model: nn.Module, layers: str | list[str] = "auto"):
    """FSDP auto-wrap policy: decoder layers, and with adapters each trainable leaf (LoRA A/B) as its own unit.

    ``layers="auto"`` takes the decoder-layer classes from the HF model's ``_no_split_modules`` (what accelerate
    and PEFT's ``fsdp_auto_wrap_policy`` do); a list names classes explicitly (``[Qwen2DecoderLayer]``).
    Separate units for trainable leaves let PEFT's fp32 adapters live next to a bf16 base: FSDP flattens a
    unit into one tensor and needs one dtype per unit (PEFT's recommended policy, peft.utils.other).
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    if layers == "auto":
        names: set[str] = set()
        for m in model.modules():
            names.update(getattr(m, "_no_split_modules", None) or [])
    else:
        names = set(layers)
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"strategy.auto_wrap_layers={layers!r}: no module class of the model matches "
                          f"{sorted(names)}; name the decoder-layer class, e.g. "
                          "strategy.auto_wrap_layers=[Qwen2DecoderLayer]")

    def trainable_leaf(m: nn.Module) -> bool:
        w = getattr(m, "weight", None)
        return not list(m.children()) and isinstance(w, torch.Tensor) and w.requires_grad

    layer_policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    if not _has_frozen_params(model):  # full finetuning: one dtype, and tied weights must stay in one unit
        return layer_policy
    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf), layer_policy])


def _has_frozen_params(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


class _RootClipFSDPPrecision(FSDPPrecision):
    """FSDPPrecision that clips by norm through the root FSDP module (Lightning's refuses norm clipping)."""

    root: nn.Module | None = None

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        # FSDP shards gradients, so torch.nn.utils.clip_grad_norm_ would clip by a per-rank norm;
        # FullyShardedDataParallel.clip_grad_norm_ computes the global norm (a collective, called on every rank):
        # https://pytorch.org/docs/stable/fsdp.html#torch.distributed.fsdp.FullyShardedDataParallel.clip_grad_norm_
        self.root.clip_grad_norm_(float(clip_val))


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, for LoRA on large decoder-only models.

    * ``auto_wrap_layers``: ``auto`` (decoder layers from ``_no_split_modules``) or class names; see
      :func:`fsdp_wrap_policy`. Ignored when ``auto_wrap_policy`` is given.
    * checkpoints: with ``state_dict_type: full`` and frozen parameters (LoRA) only the trainable tensors are
      gathered to rank 0 and saved (not the whole model); resuming loads them back with ``strict=False``.
      ``sharded`` saves every tensor sharded (distributed checkpoint) — meant for full finetuning.
    * gradient clipping by norm works (through ``FullyShardedDataParallel.clip_grad_norm_``).
    * CPU processes (gloo) work too, for tests: FSDP is given ``device_id=cpu``. Resuming on CPU restores
      wrong Adam moments (``exp_avg`` comes back equal to ``exp_avg_sq``): torch 2.13's FSDP optimizer-state
      gather (``_allgather_orig_param_states`` in ``torch/distributed/fsdp/_optim_utils.py``) keeps views of one
      gather buffer reused for every state and relies on ``.cpu()`` to copy them, a no-op for CPU tensors. GPU
      runs get real copies. No upstream issue found; CPU FSDP is for tests of the save path only.
    """

    def __init__(self, *args, auto_wrap_layers: str | list[str] | None = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if auto_wrap_layers is not None and not isinstance(auto_wrap_layers, str):
            auto_wrap_layers = [str(x) for x in auto_wrap_layers]  # a Hydra ListConfig too
        self.auto_wrap_layers = auto_wrap_layers

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if not already and self.auto_wrap_layers and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = fsdp_wrap_policy(model, self.auto_wrap_layers)
        if self._state_dict_type == "sharded" and _has_frozen_params(model):
            raise ConfigError("strategy=fsdp with state_dict_type=sharded and a LoRA adapter: resuming cannot load "
                              "a partial sharded checkpoint; use strategy.state_dict_type=full "
                              "(adapter-only checkpoints)")
        if already or self.root_device.type != "cpu":
            return super()._setup_model(model)
        # CPU: torch's FSDP refuses to guess a device when there is no accelerator ("FSDP needs a non-CPU
        # accelerator device"), and Lightning passes device_id=root_device.index (None on CPU); pass the device.
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=self.root_device,
                                         **self.kwargs)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def setup(self, trainer) -> None:
        super().setup(trainer)
        plugin = self.precision_plugin
        if type(plugin) is FSDPPrecision:
            plugin = _RootClipFSDPPrecision(plugin.precision, scaler=plugin.scaler)
            self.precision_plugin = plugin
        if isinstance(plugin, _RootClipFSDPPrecision):
            plugin.root = self.model

    def _adapter_checkpoints(self) -> bool:
        module = self.lightning_module
        return self._state_dict_type == "full" and module is not None and _has_frozen_params(module)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._adapter_checkpoints():
            return gather_state(self.lightning_module, self, trainable_only=True, rank0_only=True)
        return super().lightning_module_state_dict()


# -- DeepSpeed ---------------------------------------------------------------------------------------------

def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


class EMDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with ``extra_config``: keys deep-merged into the generated config.

    Every argument of ``lightning.pytorch.strategies.DeepSpeedStrategy`` is accepted (``stage``,
    ``offload_optimizer``, ``exclude_frozen_parameters`` ...). ``extra_config`` reaches DeepSpeed settings
    Lightning has no argument for, e.g. ``{zero_force_ds_cpu_optimizer: false}`` or
    ``{zero_optimization: {stage3_param_persistence_threshold: 0}}``.
    """

    def __init__(self, *args, extra_config: dict | None = None, **kwargs) -> None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("the deepspeed_* strategies need DeepSpeed (and a CUDA GPU): pip install 'em[deepspeed]' "
                              "(see docs/scaling.md); strategy=fsdp shards without it")
        super().__init__(*args, **kwargs)
        if extra_config:
            from omegaconf import DictConfig, OmegaConf

            extra = OmegaConf.to_container(extra_config, resolve=True) if isinstance(extra_config, DictConfig) \
                else dict(extra_config)
            _deep_merge(self.config, extra)


class CPUDeepSpeedStrategy(EMDeepSpeedStrategy):
    """DeepSpeed on CPU processes (gloo): slow, for tests of the ZeRO code paths on machines without a GPU.

    Lightning refuses DeepSpeed without CUDA and passes ``root_device.index`` (None on CPU) as DeepSpeed's
    device rank; here the device is ``cpu:<local rank>`` and the CUDA check is skipped. Not for training.
    """

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's "CUDA only" check

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # without _validate_device_index_selection (GPU indices)
