"""``zoo export-hf``'s work once its front (``zoo.weights.hf_cli``) has parsed the arguments: the model from a
registry name, a Hugging Face folder, an LM checkpoint or run folder, or a bare state dict; then the Hugging Face
folder and its tokenizer. Apart from ``zoo.weights.hf`` (the format itself) because it reads LM checkpoints
(``zoo.weights.lm``), which in turn read Hugging Face folders: this module imports both, neither imports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from zoo.models.registry import create
from zoo.models.transformer import Transformer
from zoo.weights.hf import export_hf, float_dtype, from_hf
from zoo.weights.lm import build_from_checkpoint, read_lm_checkpoint

__all__ = ["run_export_hf"]


def _load_model(spec: str, model_name: str | None, overrides: dict) -> tuple[Transformer, str | None]:
    """The model named by ``spec`` and the tokenizer it was trained with ("byte", a file, or None if unknown)."""
    path = Path(spec).expanduser()
    if not path.exists():
        model = create(spec, **overrides)  # a registry name: random init (unknown names raise with hints)
        return model, "byte" if model.config.vocab_size == 259 else None
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf(path, **overrides), str(path)
    if model_name is None and path.suffix != ".safetensors":
        # The checkpoint (or run folder) records its architecture: no --model needed.
        ckpt = read_lm_checkpoint(path)
        return build_from_checkpoint(ckpt, overrides), ckpt.tokenizer
    if model_name is None:
        raise ValueError(f"{path} is a bare safetensors file: pass --model NAME (the registry entry it was trained as)")
    from zoo.weights.checkpoint import load_torch_file
    from zoo.weights.safe_load import check_weights, read_safetensors

    if path.suffix == ".safetensors":
        sd, _ = read_safetensors(path)
    else:
        blob = load_torch_file(path)  # the one safe reader: truncated/empty/hostile files give one clear error
        sd = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict; is it a zoo checkpoint?")
    # Lightning modules hold the Transformer under an attribute (e.g. "model."): strip whatever precedes our keys.
    prefix = next((k[: -len("embed.weight")] for k in sd if k.endswith("embed.weight")), None)
    if prefix is None:
        raise ValueError(f"{path}: no 'embed.weight' tensor found; is this a zoo language-model checkpoint?")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    model = create(model_name, **overrides)
    check_weights(sd, str(path), model.state_dict())
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not match model {model_name!r} with overrides {overrides}: {err}") from err
    return model, None


def run_export_hf(args: Any, overrides: dict) -> int:
    """Write the folder for the arguments ``zoo.weights.hf_cli`` parsed (``overrides``: the ``--set`` fields)."""
    from zoo.models.tokenizer import load_tokenizer, save_hf_tokenizer

    model, recorded = _load_model(args.source, args.model, overrides)
    dtype = float_dtype(args.dtype) if args.dtype else None
    out = export_hf(model, args.out, dtype=dtype)
    print(f"wrote {out}/config.json and model.safetensors ({model.num_params():,} parameters)")
    spec = args.tokenizer or recorded
    if spec is None:
        print("no tokenizer written: the source does not record one; pass --tokenizer (e.g. --tokenizer byte)")
        return 0
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"--tokenizer {spec!r} has vocab_size={tokenizer.vocab_size} but the model has "
                         f"vocab_size={model.config.vocab_size}; pass the tokenizer the model was trained with")
    files = save_hf_tokenizer(tokenizer, out, model_max_length=model.config.max_seq_len)
    print(f"wrote {', '.join(f.name for f in files)} ({tokenizer!r}); load with "
          f"transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0
