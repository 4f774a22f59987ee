"""Pretrained DiT weights -> our `DiT`: the official checkpoint format (.pt / .safetensors, plain or wrapped as
{"model", "ema"}), diffusers `DiTTransformer2DModel` directories, and names resolved on the Hugging Face Hub or
at dl.fbaipublicfiles.com. Architecture is inferred from the tensors; pickles that need code are refused.

Our DiT reproduces the original DiT code, which is what the diffusers weights were trained as. diffusers'
re-implementation deviates in two places that hold no weights, so its outputs differ slightly from ours and the
original's on the same weights: its timestep features divide the frequency exponent by (half - 1) instead of half
(`downscale_freq_shift=1`), and the LayerNorm before its MLP uses `norm_eps` (1e-5 by default) instead of 1e-6.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from dcdit.checkpoint import load_weights_only
from dcdit.config import PRESETS, ModelConfig, from_dict
from dcdit.errors import DCDiTError
from dcdit.models.dit import DiT, grid_sincos

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
OFFICIAL_NAMES = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_dit(path_or_dir: str | os.PathLike, *, map_location: str | torch.device = "cpu", num_heads: int | None = None,
             input_size: int | None = None, cache_dir: str | os.PathLike | None = None) -> DiT:
    """A pretrained DiT (in eval mode) from a checkpoint file, a diffusers directory, or a hub name.

    `path_or_dir` is one of: an official-format state dict (.pt loaded with weights_only=True, or .safetensors),
    possibly wrapped as {"model": ..., "ema": ...} (EMA preferred); a diffusers DiTTransformer2DModel directory
    or a pipeline directory with a `transformer/` subfolder; a Hugging Face repo id ("facebook/DiT-XL-2-256");
    or an official file name ("DiT-XL-2-256x256.pt", fetched into $TORCH_HOME/hub/checkpoints). HF_HUB_OFFLINE=1
    forbids all downloads. `num_heads` is needed only when the width matches no preset and no config says it;
    `input_size` (latent side) only when the weights carry no position embedding and no config.
    """
    path = _resolve(str(path_or_dir), cache_dir)
    if path.is_dir():
        state, hub_config = _read_diffusers_dir(path, map_location)
    else:
        state, hub_config = _read_weights_file(path, map_location), None
    if _is_diffusers_state(state):
        state = diffusers_to_dit_state_dict(state)
    config = dit_config_from_state_dict(state, num_heads=num_heads, input_size=input_size, diffusers_config=hub_config,
                                        source=path)
    return _build(config, state, path).eval()


# --- architecture from tensors ---------------------------------------------------------------------------------

def dit_config_from_state_dict(state: dict[str, torch.Tensor], *, num_heads: int | None = None,
                               input_size: int | None = None, diffusers_config: dict | None = None,
                               source: Any = "state dict") -> ModelConfig:
    """The `ModelConfig` of an official-format DiT state dict, inferred from tensor shapes."""
    required = ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise DCDiTError(f"{source} is not a DiT checkpoint: tensors {', '.join(missing)} are missing "
                         f"(expected the official DiT names or a diffusers DiTTransformer2DModel)")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_hidden = fc1.shape[0] if fc1 is not None else 4 * hidden
    num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1  # the last row is the CFG null class
    out_channels, rem = divmod(state["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise DCDiTError(f"{source}: final_layer.linear has {state['final_layer.linear.weight'].shape[0]} outputs, "
                         f"expected patch^2 * {in_channels} or patch^2 * {2 * in_channels} (learned sigma)")

    heads = _infer_heads(hidden, num_heads, diffusers_config, source)
    declared = (diffusers_config or {}).get("num_embeds_ada_norm")
    if declared is not None and int(declared) != num_classes:
        raise DCDiTError(f"{source}: config.json says num_embeds_ada_norm={declared} classes but the class table has "
                         f"{num_classes} + 1 rows; the config does not belong to these weights")
    if input_size is None and diffusers_config is not None:
        input_size = int(diffusers_config["sample_size"])
    if "pos_embed" in state:
        tokens = state["pos_embed"].shape[-2]
        grid = int(round(tokens**0.5))
        if grid * grid != tokens:
            raise DCDiTError(f"{source}: pos_embed has {tokens} positions, not a square grid")
        if input_size is not None and input_size != grid * patch:
            raise DCDiTError(f"{source}: input_size={input_size} disagrees with pos_embed ({grid}x{grid} patches of "
                             f"{patch} = {grid * patch}); drop the input_size argument")
        input_size = grid * patch
    if input_size is None:
        raise DCDiTError(f"{source} has no pos_embed to read the input size from; pass input_size= (the latent "
                         f"side, 32 for 256px images)")
    return from_dict(ModelConfig, dict(
        arch="dit", depth=depth, hidden_size=hidden, num_heads=heads, input_size=input_size,
        in_channels=in_channels, num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=mlp_hidden / hidden, patch_size=patch))


def _infer_heads(hidden: int, num_heads: int | None, diffusers_config: dict | None, source: Any) -> int:
    """Heads do not change any tensor shape: take them from the argument, the diffusers config or a preset."""
    configured = None if diffusers_config is None else int(diffusers_config["num_attention_heads"])
    if configured is not None:
        width = configured * int(diffusers_config["attention_head_dim"])
        if width != hidden:
            raise DCDiTError(f"{source}: config.json says {configured} heads x "
                             f"{diffusers_config['attention_head_dim']} = {width} channels but the weights have "
                             f"{hidden}; the config does not belong to these weights")
        if num_heads is not None and num_heads != configured:
            raise DCDiTError(f"num_heads={num_heads} contradicts {source}'s config.json ({configured} heads); "
                             f"drop the num_heads argument")
        return configured
    if num_heads is not None:
        return num_heads
    widths = {p["hidden_size"]: p["num_heads"] for p in PRESETS.values()}
    if hidden not in widths:
        raise DCDiTError(f"{source}: hidden size {hidden} matches no preset, so the number of attention heads is "
                         f"unknown; pass num_heads= to load_dit")
    return widths[hidden]


# --- diffusers names -> official names -----------------------------------------------------------------------------

def _is_diffusers_state(state: dict[str, torch.Tensor]) -> bool:
    return "pos_embed.proj.weight" in state


# Per-block renames; to_q/to_k/to_v are concatenated into qkv separately.
_DIFFUSERS_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_DIFFUSERS_EMBEDDERS = {
    "timestep_embedder.linear_1": "t_embedder.mlp.0",
    "timestep_embedder.linear_2": "t_embedder.mlp.2",
    "class_embedder.embedding_table": "y_embedder.embedding_table",
}


def diffusers_to_dit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiTTransformer2DModel state dict to the official DiT names.

    diffusers gives every block its own copy of the timestep/class embedders (block 0's also feeds the final
    layer); the original has one. Converted checkpoints hold identical copies; differing copies are refused.
    """
    out: dict[str, torch.Tensor] = {}
    remaining = dict(state)
    for src, dst in _DIFFUSERS_TOP.items():
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in remaining:
                out[f"{dst}.{kind}"] = remaining.pop(f"{src}.{kind}")
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    for i in blocks:
        pre = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [remaining.pop(f"{pre}attn1.to_{x}.{kind}", None) for x in "qkv"]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
            elif any(p is not None for p in parts):
                raise DCDiTError(f"diffusers weights: block {i} has only some of attn1.to_q/to_k/to_v.{kind}")
            for src, dst in _DIFFUSERS_BLOCK.items():
                if f"{pre}{src}.{kind}" in remaining:
                    out[f"blocks.{i}.{dst}.{kind}"] = remaining.pop(f"{pre}{src}.{kind}")
        for src, dst in _DIFFUSERS_EMBEDDERS.items():
            for kind in ("weight", "bias"):
                name = f"{pre}norm1.emb.{src}.{kind}"
                if name not in remaining:
                    continue
                tensor = remaining.pop(name)
                key = f"{dst}.{kind}"
                if key not in out:
                    out[key] = tensor
                elif not torch.equal(out[key], tensor):
                    raise DCDiTError(f"diffusers weights: transformer_blocks.{i}.norm1.emb.{src}.{kind} differs from "
                                     f"block {blocks[0]}'s; DiT shares one timestep/class embedder, so only "
                                     f"checkpoints converted from DiT (identical copies in every block) can load")
    if remaining:
        names = sorted(remaining)
        raise DCDiTError(f"diffusers weights hold tensors a DiT has no place for: {', '.join(names[:6])}"
                         f"{f' and {len(names) - 6} more' if len(names) > 6 else ''} (norm_elementwise_affine or "
                         f"another DiTTransformer2DModel option this loader does not support?)")
    return out


def dit_to_diffusers_state_dict(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_dit_state_dict`: official DiT names -> DiTTransformer2DModel names, qkv split
    into to_q/to_k/to_v and the one timestep/class embedder copied into each of the `depth` blocks. pos_embed is
    dropped: diffusers computes the same fixed sin-cos table itself."""
    out: dict[str, torch.Tensor] = {}
    renames = {f"{dst}.": f"{src}." for src, dst in _DIFFUSERS_TOP.items()}
    for i in range(depth):
        renames.update({f"blocks.{i}.{dst}.": f"transformer_blocks.{i}.{src}."
                        for src, dst in _DIFFUSERS_BLOCK.items()})
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            for part, tensor in zip("qkv", value.chunk(3, 0)):
                out[f"transformer_blocks.{m.group(1)}.attn1.to_{part}.{m.group(2)}"] = tensor.clone()
            continue
        embedder = next((src for src, dst in _DIFFUSERS_EMBEDDERS.items() if key.startswith(f"{dst}.")), None)
        if embedder is not None:
            kind = key.rsplit(".", 1)[1]
            for i in range(depth):
                out[f"transformer_blocks.{i}.norm1.emb.{embedder}.{kind}"] = value.clone()
            continue
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            raise DCDiTError(f"DiT weights hold {key!r}, which has no place in a DiTTransformer2DModel")
        out[renames[prefix] + key[len(prefix):]] = value
    return out


# --- reading files ---------------------------------------------------------------------------------------------------

def _read_weights_file(path: Path, map_location) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a weights-only torch pickle, unwrapped to one official state dict."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    obj = load_weights_only(path, map_location)
    return _unwrap(obj, path)


def _read_safetensors(path: Path, map_location) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(torch.device(map_location)))
    except (SafetensorError, OSError) as err:
        raise DCDiTError(f"cannot read {path}: not a valid safetensors file ({err}); re-download or re-export it")


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: EMA over model weights (samples use EMA), wrapper prefixes removed."""
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj) and not any(
            isinstance(v, torch.Tensor) for v in obj.values()):
        obj = obj["ema"] if obj.get("ema") is not None else obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DCDiTError(f"{path} holds no DiT state dict: expected a dict of tensors, or one under 'ema'/'model'")
    state = {}
    for key, value in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _read_diffusers_dir(path: Path, map_location) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and config.json of a DiTTransformer2DModel directory (or a pipeline's `transformer/`)."""
    root = path / "transformer" if (path / "transformer" / "config.json").exists() else path
    config_path = root / "config.json"
    if not config_path.exists():
        raise DCDiTError(f"{path} is not a diffusers model directory: no config.json (nor transformer/config.json); "
                         f"pass the DiTTransformer2DModel directory or a checkpoint file")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise DCDiTError(f"{config_path} is not valid JSON ({err})") from None
    kind = config.get("_class_name", "DiTTransformer2DModel")
    if kind not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise DCDiTError(f"{root} holds a diffusers {kind}, not a DiTTransformer2DModel")
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate")):
        if config.get(key, want) != want:
            raise DCDiTError(f"{config_path}: {key}={config[key]!r} is not a DiT ({key}={want!r} expected)")
    for key in ("num_attention_heads", "attention_head_dim", "sample_size"):
        if key not in config:
            raise DCDiTError(f"{config_path} lacks '{key}'; it is not a DiTTransformer2DModel config")

    shards = sorted(root.glob(f"{_DIFFUSERS_WEIGHTS}*.safetensors"))
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(shard, map_location))
        return state, config
    bins = sorted(root.glob(f"{_DIFFUSERS_WEIGHTS}*.bin"))
    if bins:
        state = {}
        for shard in bins:
            state.update(_unwrap(load_weights_only(shard, map_location), shard))
        return state, config
    raise DCDiTError(f"{root} has a config.json but no {_DIFFUSERS_WEIGHTS}.safetensors or .bin; "
                     f"download the weights into it")


def _build(config: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> DiT:
    """A DiT holding `state` (float32, on the tensors' device), listing whatever does not fit.

    The model is built on the meta device and the loaded tensors assigned to it, so an XL model is not first
    randomly initialised only to be overwritten. A missing pos_embed (diffusers does not store it) is computed.
    """
    with torch.device("meta"):
        model = DiT(config)
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - {"pos_embed"})
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    problems = ([f"missing {', '.join(missing[:6])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:6])}"] if unexpected else []) + \
               ([f"wrong shape {', '.join(wrong[:6])}"] if wrong else [])
    if problems:
        raise DCDiTError(f"{source} does not fit the DiT inferred from it: {'; '.join(problems)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "pos_embed" not in state:
        device = next(iter(state.values())).device
        grid = config.input_size // config.patch_size
        state["pos_embed"] = grid_sincos(config.hidden_size, grid, grid)[None].to(device)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# --- resolving names -------------------------------------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve(name: str, cache_dir) -> Path:
    """A local file or directory for `name`, downloading hub names unless offline."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if path.name in OFFICIAL_NAMES:
        return _official_download(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith(_WEIGHT_SUFFIXES) and not name.startswith("."):
        return _hub_download(name, cache_dir)
    raise DCDiTError(f"no such file or directory: {name}; pass a DiT checkpoint (.pt/.safetensors), a diffusers "
                     f"DiTTransformer2DModel directory, a hub repo id like facebook/DiT-XL-2-256, or one of "
                     f"{', '.join(OFFICIAL_NAMES)}")


def _official_download(path: Path) -> Path:
    """An official DiT checkpoint: the given path, or torch.hub's cache ($TORCH_HOME/hub/checkpoints)."""
    url = OFFICIAL_URL.format(name=path.name)
    if path.parent != Path("."):  # an explicit location that does not exist
        raise DCDiTError(f"no such file: {path}; download {url} to that path")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / path.name
    if dest.exists():
        return dest
    if _offline():
        raise DCDiTError(f"{path.name} is not in the torch hub cache and HF_HUB_OFFLINE is set: download {url} to "
                         f"{dest} (or anywhere, and pass that path)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except Exception as err:  # urllib raises URLError, HTTPError, socket and SSL errors
        raise DCDiTError(f"could not download {url} ({type(err).__name__}: {err}); download it to {dest} "
                         f"(or anywhere, and pass that path)") from None
    return dest


def _hub_download(repo_id: str, cache_dir) -> Path:
    """A snapshot of a Hugging Face repo holding a DiTTransformer2DModel (root or `transformer/`), weights only."""
    from huggingface_hub import snapshot_download

    fix = (f"where there is internet run `hf download {repo_id} --include 'transformer/*' --local-dir DIR` "
           f"and pass DIR to load_dit (or unset HF_HUB_OFFLINE)")
    safetensors = ["config.json", "transformer/config.json", f"{_DIFFUSERS_WEIGHTS}*.safetensors*",
                   f"transformer/{_DIFFUSERS_WEIGHTS}*.safetensors*"]
    pickles = [f"{_DIFFUSERS_WEIGHTS}*.bin", f"transformer/{_DIFFUSERS_WEIGHTS}*.bin"]
    try:
        # Skipping .bin when safetensors exist halves the download; a .bin-only repo is fetched on a second pass.
        folder = Path(snapshot_download(repo_id, allow_patterns=safetensors, cache_dir=cache_dir,
                                        local_files_only=_offline()))
        if not list(folder.glob(f"**/{_DIFFUSERS_WEIGHTS}*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=safetensors + pickles, cache_dir=cache_dir,
                                            local_files_only=_offline()))
    except Exception as err:  # huggingface_hub raises its own offline, not-found, auth and HTTP errors
        reason = "HF_HUB_OFFLINE is set and it is not cached" if _offline() else f"{type(err).__name__}"
        raise DCDiTError(f"could not get {repo_id} from the Hugging Face Hub ({reason}); {fix}") from None
    return folder
