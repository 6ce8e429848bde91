"""Hugging Face Gemma / Gemma 2 checkpoints <-> the zoo Transformer.

``from_hf(folder)`` reads ``config.json`` and ``model.safetensors`` (or the shards named by
``model.safetensors.index.json``) of a local folder; ``export_hf(model, folder)`` writes the same layout back, so
``transformers`` can load what the zoo trained. Naming trap handled here: in Gemma 1 ``post_attention_layernorm`` is
the pre-MLP norm; in Gemma 2 it is a real post-attention norm and the pre-MLP norm is ``pre_feedforward_layernorm``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from zoo.files import atomic_path, atomic_write_text
from zoo.models.transformer import Transformer, TransformerConfig
from zoo.weights.dtypes import FLOAT_DTYPES

SUPPORTED = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}
_LAYER_TYPE = {"sliding_attention": "local", "full_attention": "global"}


# ----------------------------------------------------------------------------------------------- config
def _pattern(layer_types: list[str]) -> tuple[str, ...]:
    """Shortest cycle reproducing the per-layer attention types."""
    ours = [_LAYER_TYPE[t] for t in layer_types]
    for p in range(1, len(ours) + 1):
        if all(ours[i] == ours[i % p] for i in range(len(ours))):
            return tuple(ours[:p])
    return tuple(ours)


_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                           "query_pre_attn_scalar")
_OPTIONAL_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping")


def check_config(cfg: object, source: str = "config.json") -> dict:
    """Refuse a malformed config.json dict (wrong types, zero/negative sizes) with one line naming the field."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object of model settings, found a {type(cfg).__name__}; "
                         "re-download config.json")
    for field in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        if field not in cfg or (cfg[field] is None and field in _OPTIONAL_POSITIVE_INTS):
            if field in _POSITIVE_INTS:
                raise ValueError(f"{source}: required field {field!r} is missing")
            continue
        v = cfg[field]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{source}: {field}={v!r} must be a positive integer; fix config.json")
    for field in _OPTIONAL_POSITIVE_NUMBERS:
        v = cfg.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                              or not math.isfinite(v)):
            raise ValueError(f"{source}: {field}={v!r} must be a positive number (or null); fix config.json")
    if "tie_word_embeddings" in cfg and not isinstance(cfg["tie_word_embeddings"], bool):
        raise ValueError(f"{source}: tie_word_embeddings={cfg['tie_word_embeddings']!r} must be true or false")
    rope = cfg.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_parameters={rope!r:.80} must be an object such as "
                             '{"rope_type": "default", "rope_theta": 10000.0} (or null); fix config.json')
        if not isinstance(rope.get("rope_type", "default"), str):
            raise ValueError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r:.80} must be a string")
        theta = rope.get("rope_theta")
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0
                                  or not math.isfinite(theta)):
            raise ValueError(f"{source}: rope_parameters.rope_theta={theta!r:.80} must be a positive number; fix "
                             "config.json")
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != cfg["num_hidden_layers"]
                              or not all(isinstance(t, str) for t in types)):
        raise ValueError(f"{source}: layer_types must be a list of {cfg['num_hidden_layers']} strings "
                         f"(num_hidden_layers), found {types!r:.80}")
    return cfg


def config_from_hf(cfg: dict, source: str = "config.json") -> TransformerConfig:
    """TransformerConfig of a Hugging Face Gemma / Gemma 2 ``config.json`` dict."""
    check_config(cfg, source)
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED:
        raise ValueError(f"{source}: model_type={mtype!r} is not supported; from_hf reads {sorted(SUPPORTED)} "
                         f"(architectures {sorted(SUPPORTED.values())})")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    # Gemma 1 configs say "gelu" but the released models (and transformers) use the tanh approximation.
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{source}: hidden_activation={act!r} is not supported (expected 'gelu_pytorch_tanh')")
    if cfg.get("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not supported by the zoo Transformer")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_type={rope.get('rope_type')!r} is not supported (only 'default')")
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    fields = dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads", n_heads), head_dim=head_dim,
        d_ff=cfg["intermediate_size"], max_seq_len=cfg.get("max_position_embeddings", 8192), ffn="geglu",
        norm_eps=cfg.get("rms_norm_eps", 1e-6), norm_unit_offset=True, embed_scale=True,
        tie_embeddings=cfg.get("tie_word_embeddings", True), positions="rope",
        rope_base=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
    )
    if mtype == "gemma2":
        n = cfg["num_hidden_layers"]
        # Older configs lack layer_types; transformers then alternates sliding (even layers) / global.
        types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        unknown = sorted(set(types) - set(_LAYER_TYPE))
        if unknown:
            raise ValueError(f"{source}: layer_types has unsupported entries {unknown}")
        window = cfg.get("sliding_window")
        fields.update(post_norms=True, layer_pattern=_pattern(types),
                      window=window if "sliding_attention" in types else None,
                      query_scale=cfg.get("query_pre_attn_scalar", head_dim) ** -0.5,
                      attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"))
    return TransformerConfig(**fields)


def config_to_hf(c: TransformerConfig) -> dict:
    """Hugging Face config.json dict for a Gemma-compatible TransformerConfig (ValueError naming the field if not)."""
    need = dict(positions="rope", ffn="geglu", norm_unit_offset=True, embed_scale=True)
    for field, value in need.items():
        if getattr(c, field) != value:
            raise ValueError(f"cannot export to Hugging Face Gemma: config.{field}={getattr(c, field)!r}, "
                             f"Gemma needs {value!r}")
    gemma2 = c.post_norms or c.window is not None or c.attn_softcap is not None or c.final_softcap is not None
    if not gemma2 and c.scale != 1 / math.sqrt(c.head_dim):
        raise ValueError(f"cannot export query_scale={c.query_scale} as Gemma 1 (fixed head_dim**-0.5); "
                         "Gemma 2 configs carry query_pre_attn_scalar")
    if gemma2 and not c.post_norms:
        raise ValueError("cannot export a config with windows/soft-caps but post_norms=False: Gemma 2 has post-norms")
    out = dict(
        architectures=[SUPPORTED["gemma2" if gemma2 else "gemma"]], model_type="gemma2" if gemma2 else "gemma",
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.d_ff, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", attention_bias=False,
        tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_base,
        rope_parameters={"rope_theta": c.rope_base, "rope_type": "default"}, torch_dtype="float32",
    )
    if gemma2:
        inv = {v: k for k, v in _LAYER_TYPE.items()}
        window = c.window if c.window is not None else c.max_seq_len
        scalar = c.scale ** -2
        if abs(scalar - round(scalar)) > 1e-6 * scalar:
            raise ValueError(f"cannot export query_scale={c.scale}: Gemma 2 stores query_pre_attn_scalar = "
                             f"query_scale**-2 = {scalar} as an integer")
        out.update(layer_types=[inv["local" if c.layer_window(i) else "global"] for i in range(c.n_layers)],
                   sliding_window=window, query_pre_attn_scalar=int(round(scalar)),
                   attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap)
    return out


# ----------------------------------------------------------------------------------------------- names
def hf_names(c: TransformerConfig, gemma2: bool) -> dict[str, str]:
    """Map our state_dict keys -> Hugging Face keys."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(c.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        for p in ("q", "k", "v", "o"):
            names[f"{ours}attn.{p}_proj.weight"] = f"{hf}self_attn.{p}_proj.weight"
        for p in ("gate", "up", "down"):
            names[f"{ours}ffn.{p}_proj.weight"] = f"{hf}mlp.{p}_proj.weight"
        names[f"{ours}attn_norm.weight"] = f"{hf}input_layernorm.weight"
        if gemma2:
            names[f"{ours}post_attn_norm.weight"] = f"{hf}post_attention_layernorm.weight"
            names[f"{ours}ffn_norm.weight"] = f"{hf}pre_feedforward_layernorm.weight"
            names[f"{ours}post_ffn_norm.weight"] = f"{hf}post_feedforward_layernorm.weight"
        else:
            names[f"{ours}ffn_norm.weight"] = f"{hf}post_attention_layernorm.weight"  # Gemma 1: the pre-MLP norm
    return names


def _shard_map(folder: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (single file or index + shards)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from err
        files = {name: folder / shard for name, shard in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing}; download every shard")
        return files
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _same_tensor(files: dict[str, Path], a: str, b: str) -> bool:
    from safetensors import safe_open

    def get(name: str) -> torch.Tensor:
        with safe_open(str(files[name]), framework="pt") as f:
            return f.get_tensor(name)

    ta, tb = get(a), get(b)
    return ta.shape == tb.shape and bool(torch.equal(ta, tb))


def _fields_of(hf_name: str) -> str:
    """The config.json fields that determine a tensor's shape (for error messages)."""
    for part, fields in (("embed_tokens", "vocab_size, hidden_size"), ("lm_head", "vocab_size, hidden_size"),
                         ("q_proj", "num_attention_heads, head_dim, hidden_size"),
                         ("o_proj", "num_attention_heads, head_dim, hidden_size"),
                         ("k_proj", "num_key_value_heads, head_dim, hidden_size"),
                         ("v_proj", "num_key_value_heads, head_dim, hidden_size"),
                         ("mlp", "intermediate_size, hidden_size"), ("norm", "hidden_size")):
        if part in hf_name:
            return fields
    return "hidden_size"


# ----------------------------------------------------------------------------------------------- load / save
def float_dtype(dtype: torch.dtype | str, what: str = "--dtype") -> torch.dtype:
    """A floating-point torch dtype from a dtype or its name ('bfloat16', 'torch.float16'); anything else (an
    unknown name, an integer dtype) is refused in one line naming ``what``."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    found = getattr(torch, name, None) if name else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point or name not in FLOAT_DTYPES:
        raise ValueError(f"{what} {dtype!r} is not a floating-point dtype; use one of {', '.join(FLOAT_DTYPES)}")
    return found


def from_hf(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
            **overrides) -> Transformer:
    """Load a local Hugging Face Gemma / Gemma 2 folder as a zoo Transformer (overrides: e.g. attn_backend)."""
    from safetensors import safe_open

    from zoo.weights.safe_load import check_weights

    dtype = float_dtype(dtype, "dtype")
    folder = Path(path).expanduser()
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: from_hf expects a local Hugging Face model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file}: not valid JSON ({err}); re-download config.json") from None
    config = config_from_hf(raw, str(cfg_file))
    if overrides:
        config = config.replace(**overrides)
    gemma2 = raw["model_type"] == "gemma2"
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v for k, v in model.state_dict().items()}
    names = hf_names(config, gemma2)
    files = _shard_map(folder)
    missing = [hf for hf in names.values() if hf not in files]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"required by {cfg_file.name} (model_type={raw['model_type']!r})")
    used = set(names.values())
    unused = sorted(set(files) - used)
    if not config.tie_embeddings or "lm_head.weight" not in unused:
        pass
    elif _same_tensor(files, "lm_head.weight", "model.embed_tokens.weight"):
        unused.remove("lm_head.weight")  # a tied head saved anyway: identical to the embedding, nothing is lost
    if unused:
        raise ValueError(f"{folder}: {len(unused)} tensor(s) in the weights are not used by {cfg_file.name} "
                         f"(num_hidden_layers={raw['num_hidden_layers']}, tie_word_embeddings="
                         f"{config.tie_embeddings}): {unused[:5]}{' ...' if len(unused) > 5 else ''}; the config "
                         "and weights do not match, fix config.json")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, hf in names.items():
        by_file.setdefault(files[hf], []).append((ours, hf))
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for ours, hf in pairs:
                t = f.get_tensor(hf)
                want = tuple(expected[ours].shape)
                if tuple(t.shape) != want:
                    raise ValueError(f"{file.name}: tensor {hf!r} has shape {tuple(t.shape)} but {cfg_file.name} "
                                     f"implies {want} (fields {_fields_of(hf)}); the config and weights do not match")
                check_weights({hf: t}, str(file), {hf: expected[ours]})
                cast = t.to(dtype)
                if not bool(torch.isfinite(cast).all()):
                    raise ValueError(f"{file}: tensor {hf!r} overflows {str(dtype).removeprefix('torch.')} (values "
                                     f"up to {float(t.abs().max()):.3g}); load with a wider dtype (float32)")
                state[ours] = cast
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def export_hf(model: Transformer, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a zoo Transformer as a Hugging Face Gemma / Gemma 2 folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    hf_cfg = config_to_hf(model.config)
    if any(model.config.is_routed(i) for i in range(model.config.n_layers)):
        raise ValueError("cannot export a routed (mixture-of-experts) model to Hugging Face Gemma")
    names = hf_names(model.config, hf_cfg["model_type"] == "gemma2")
    sd = model.state_dict()
    tensors = {hf: sd[ours].detach().to(dtype or sd[ours].dtype).contiguous().cpu() for ours, hf in names.items()}
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(hf_cfg, indent=2) + "\n")
    remove_superseded_weights(folder)
    return folder


# Weight files of an earlier export that the new model.safetensors supersedes: loaders (ours, transformers) prefer a
# safetensors index over model.safetensors, so a stale index would load the OLD model.
_SUPERSEDED = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)|pytorch_model\.bin|"
                         r"(model\.safetensors|pytorch_model\.bin)\.index\.json")


def remove_superseded_weights(folder: Path) -> list[Path]:
    """Delete the sharded / .bin weight files (and their indexes) of an earlier export in ``folder``; the index goes
    first, so a reader never sees an index whose shards are gone. Returns what was removed."""
    removed = []
    index = folder / "model.safetensors.index.json"
    named: set[str] = set()
    if index.is_file():
        try:
            named = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            named = set()
    for path in sorted(folder.iterdir(), key=lambda p: not p.name.endswith(".index.json")):
        stale_shard = path.name in named and path.suffix == ".safetensors" and path.name != "model.safetensors"
        if path.is_file() and (_SUPERSEDED.fullmatch(path.name) or stale_shard):
            path.unlink()
            removed.append(path)
    return removed


def load_hf_tokenizer(path: str | Path):
    """The tokenizer of a Hugging Face folder (tokenizer.json preferred, else tokenizer.model)."""
    from zoo.models.tokenizer import load_tokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the Hugging Face model folder")
    return load_tokenizer(folder)
