"""A Gemini-style multimodal decoder: a zoo vision encoder's feature tokens spliced into a zoo decoder's token stream.

    images uint8 [N, 3, S, S] -> normalise (on the device) -> encoder.forward_features -> token grid [N, g*g, C]
      -> adaptive average pool to tokens_per_image (k x k) -> projector (linear | 2-layer MLP) -> [N, k*k, d_model]
    input_ids [B, T] (BOI, IMAGE x k*k, EOI where each image stands; see zoo/data/interleaved.py)
      -> decoder embeddings, IMAGE positions overwritten by the projected tokens in reading order -> decoder

The decoder is any zoo Transformer (Gemma, Gemma 2, Gopher, dense or routed FFN). Its vocabulary as built is the text
vocabulary V; three rows are appended for IMAGE = V, BOI = V + 1, EOI = V + 2. The encoder is frozen (eval mode,
no gradients), partly trained (its last stage) or fully trained (``train_encoder``). With a KV cache the image
tokens enter the cache once, in the prefill; decoding steps then feed text ids only.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Pairings build their encoder and decoder by name through the builder table (not zoo.models.registry, which
# imports this family); importing the decoder and encoder families here registers every name a pairing uses.
from zoo.models import lm_configs  # noqa: F401 - registers the decoders
from zoo.models.builders import build, register
from zoo.models.transformer import Transformer, sample_next
from zoo.models.vision import feature_tokens

TRAIN_ENCODER = ("frozen", "last", "full")
PROJECTORS = ("linear", "mlp")
# The statistics the zoo's BYOL views are normalised with (augment's IMAGENET_MEAN/STD): an encoder pretrained there
# sees the same input distribution here. zoo may not import augment's constants for its models, so they are restated.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageProjector(nn.Module):
    """Encoder feature width -> decoder width: one linear map, or Linear-GELU-Linear (LLaVA-1.5's MLP projector)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden: int | None = None) -> None:
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector={kind!r}; choose one of {PROJECTORS}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            h = hidden or out_dim
            self.net = nn.Sequential(nn.Linear(in_dim, h), nn.GELU(), nn.Linear(h, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> [..., out_dim]."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"the encoder gives {x.shape[-1]}-wide feature tokens but the projector was built for "
                             f"{self.in_dim}; build the model with this encoder (or load weights of the encoder it "
                             "was built for)")
        return self.net(x)


def last_stage(encoder: nn.Module) -> list[nn.Module]:
    """The modules of an encoder's last stage, in order: ResNet ``layer4``, ConvNetTiny's last conv block, timm's
    last of ``stages`` / ``layers`` / ``blocks``."""
    if hasattr(encoder, "layer4"):
        return [encoder.layer4]
    features = getattr(encoder, "features", None)
    if isinstance(features, nn.Sequential) and len(features) >= 3:
        return list(features)[-3:]  # ConvNetTiny: conv, BN, ReLU per stage
    for name in ("stages", "layers", "blocks"):
        seq = getattr(encoder, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return [seq[-1]]
    raise ValueError(f"train_encoder='last' does not know the last stage of {type(encoder).__name__}; use "
                     "train_encoder='frozen' or 'full'")


def _prepare_decoder(decoder: Transformer, extra: int) -> Transformer:
    """Append ``extra`` embedding (and untied output) rows to ``decoder`` for the image ids; returns it."""
    c = decoder.config
    old = decoder.embed.weight
    emb = nn.Embedding(c.vocab_size + extra, c.d_model, device=old.device, dtype=old.dtype)
    if not old.is_meta:
        with torch.no_grad():
            emb.weight[: c.vocab_size].copy_(old)
            nn.init.normal_(emb.weight[c.vocab_size:], std=c.init_std)
    decoder.embed = emb
    if decoder.lm_head is not None:
        head = nn.Linear(c.d_model, c.vocab_size + extra, bias=False, device=old.device, dtype=old.dtype)
        if not old.is_meta:
            with torch.no_grad():
                head.weight[: c.vocab_size].copy_(decoder.lm_head.weight)
                nn.init.normal_(head.weight[c.vocab_size:], std=c.init_std)
        decoder.lm_head = head
    decoder.config = c.replace(vocab_size=c.vocab_size + extra)
    return decoder


class MultimodalDecoder(nn.Module):
    """Vision encoder -> pooled feature tokens -> projector -> IMAGE positions of a decoder's token stream.

    Args:
        encoder: a zoo vision name (``zoo.available()``, ``timm:<name>``) or a built encoder (e.g. from
            ``zoo.load_backbone``); it needs ``forward_features`` and ``num_features``.
        decoder: a zoo Transformer name or a built Transformer; its vocabulary is the text vocabulary.
        encoder_overrides / decoder_overrides: keyword overrides of the named builders.
        tokens_per_image: image tokens in the sequence (a square k*k, at most the encoder's grid); None: the grid.
        projector: ``linear`` or ``mlp``; projector_hidden: the MLP's hidden width (None: the decoder width).
        train_encoder: ``frozen`` (eval mode, no gradients), ``last`` (only the last stage trains) or ``full``.
        image_size: the side of the images the encoder takes (checked on every forward).
        mean / std: per-channel normalisation of the uint8 images, applied on the device.
    """

    def __init__(self, encoder: str | nn.Module = "convnet_tiny", decoder: str | nn.Module = "gemma2-tiny", *,
                 encoder_overrides: dict[str, Any] | None = None, decoder_overrides: dict[str, Any] | None = None,
                 tokens_per_image: int | None = 4, projector: str = "mlp", projector_hidden: int | None = None,
                 train_encoder: str = "frozen", image_size: int = 32,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        if train_encoder not in TRAIN_ENCODER:
            raise ValueError(f"train_encoder={train_encoder!r}; choose one of {TRAIN_ENCODER}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.encoder_name = encoder if isinstance(encoder, str) else getattr(encoder, "zoo_arch",
                                                                             type(encoder).__name__)
        self.encoder = build(encoder, **(encoder_overrides or {})) if isinstance(encoder, str) else encoder
        self.encoder_overrides = dict(encoder_overrides or {}) if isinstance(encoder, str) else dict(
            getattr(encoder, "zoo_arch_overrides", {}))
        if not hasattr(self.encoder, "forward_features") or not hasattr(self.encoder, "num_features"):
            raise TypeError(f"encoder {self.encoder_name!r} has no forward_features / num_features; pass a zoo vision "
                            "encoder (zoo.create(<vision name>) or zoo.load_backbone(...))")
        dec = build(decoder, **(decoder_overrides or {})) if isinstance(decoder, str) else decoder
        if not isinstance(dec, Transformer):
            raise TypeError(f"decoder {decoder!r} is not a zoo Transformer; pick a language model from zoo.available()")
        self.text_vocab_size = dec.config.vocab_size
        self.decoder = _prepare_decoder(dec, 3)
        self.image_id, self.boi_id, self.eoi_id = (self.text_vocab_size + i for i in range(3))
        self.image_size, self.train_encoder = image_size, train_encoder
        self._norm_stats = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.grid = self._grid_shape()
        n_grid = self.grid[0] * self.grid[1]
        self.tokens_per_image = n_grid if tokens_per_image is None else tokens_per_image
        k = math.isqrt(self.tokens_per_image)
        if self.tokens_per_image < 1 or self.tokens_per_image > n_grid or (k * k != self.tokens_per_image
                                                                           and self.tokens_per_image != n_grid):
            raise ValueError(f"tokens_per_image={tokens_per_image} does not fit {self.encoder_name!r}'s "
                             f"{self.grid[0]}x{self.grid[1]} token grid at image_size={image_size}; use a square "
                             f"number of at most {n_grid} (or None for the whole grid)")
        self.projector = ImageProjector(self.encoder.num_features, self.decoder.config.d_model, projector,
                                        projector_hidden)
        self._set_trainable()
        self._image_flops: dict[str, float] | None = None
        # Frozen parts in eval mode from the start: Lightning restores each submodule's recorded mode after
        # validation (bypassing train()), so the mode a module is built in must already follow the rule.
        self.train(self.training)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Refill the normalisation buffers (called when a meta-device build is allocated with ``to_empty()``, as
        for sharded training); the parameters belong to the submodules, which reset their own."""
        mean, std = self._norm_stats
        self.mean.copy_(torch.tensor(mean).view_as(self.mean))
        self.std.copy_(torch.tensor(std).view_as(self.std))

    # -- construction helpers -----------------------------------------------------------------------------------
    def _grid_shape(self) -> tuple[int, int]:
        # One dry run (free on the meta device) in eval mode, so batch-norm statistics are not touched.
        p = next(self.encoder.parameters())
        was = self.encoder.training
        self.encoder.eval()
        with torch.no_grad():
            feats = self.encoder.forward_features(torch.zeros(1, 3, self.image_size, self.image_size,
                                                              device=p.device, dtype=p.dtype))
        self.encoder.train(was)
        if feats.dim() == 4:
            nhwc = getattr(self.encoder, "output_fmt", "NCHW") == "NHWC"
            return (feats.shape[1], feats.shape[2]) if nhwc else (feats.shape[2], feats.shape[3])
        return (1, feats.shape[1])  # a token sequence (vision transformer): pooled in 1-D

    def _set_trainable(self) -> None:
        if self.train_encoder == "full":
            return
        self.encoder.requires_grad_(False)
        if self.train_encoder == "last":
            for m in last_stage(self.encoder):
                m.requires_grad_(True)

    def train(self, mode: bool = True) -> "MultimodalDecoder":
        """Train mode for the decoder and projector; a frozen encoder (or the frozen part) stays in eval mode."""
        super().train(mode)
        if mode and self.train_encoder != "full":
            self.encoder.eval()  # frozen batch-norm statistics: the pretrained ones are part of the encoder
            if self.train_encoder == "last":
                for m in last_stage(self.encoder):
                    m.train(True)
        return self

    @property
    def config(self) -> Any:
        """The decoder's TransformerConfig (vocab_size includes the three image ids)."""
        return self.decoder.config

    # -- images -------------------------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Raise a one-line ValueError unless ``images`` is [N, 3, image_size, image_size]."""
        if images.dim() != 4 or images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"images must be [N, {self.mean.shape[1]}, H, W], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {images.shape[-2]}x{images.shape[-1]} but the encoder takes "
                             f"{self.image_size}x{self.image_size}; set data.image_size={self.image_size} or build "
                             f"the model with image_size={images.shape[-1]}")

    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) images [N, 3, S, S] -> projected image tokens [N, tokens_per_image, d_model]."""
        self.check_images(images)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = ((x - self.mean) / self.std).to(next(self.encoder.parameters()).dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder != "frozen"):
            tokens = feature_tokens(self.encoder, x)  # [N, g, C]
        tokens = self.pool(tokens)
        return self.projector(tokens.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        """The projector's parameter dtype."""
        return next(self.projector.parameters()).dtype

    def pool(self, tokens: Tensor) -> Tensor:
        """[N, g, C] -> [N, tokens_per_image, C]: adaptive average pooling over the 2-D grid (1-D for a sequence)."""
        n, g, c = tokens.shape
        if g == self.tokens_per_image:
            return tokens
        h, w = self.grid
        k = math.isqrt(self.tokens_per_image)
        if h > 1 and h * w == g:
            grid = tokens.transpose(1, 2).reshape(n, c, h, w)
            return F.adaptive_avg_pool2d(grid, (k, k)).flatten(2).transpose(1, 2)
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.tokens_per_image).transpose(1, 2)

    # -- the token stream ---------------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: Tensor, images: Tensor | None = None) -> Tensor:
        """Decoder input embeddings [B, T, D]: text ids looked up, IMAGE positions replaced by image tokens."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        mask = input_ids == self.image_id
        n_pos = int(mask.sum())  # one host sync per call: a miscount would silently misplace images
        n_img = 0 if images is None else images.shape[0]
        if n_pos != n_img * self.tokens_per_image:
            raise ValueError(f"input_ids hold {n_pos} image placeholder tokens (id {self.image_id}) but {n_img} "
                             f"image(s) x tokens_per_image={self.tokens_per_image} = {n_img * self.tokens_per_image} "
                             "were expected; each <image> marker needs exactly one image, expanded to BOI, "
                             f"{self.tokens_per_image} x IMAGE, EOI (zoo.data.interleaved.encode_interleaved)")
        x = self.decoder.embed(input_ids)
        if n_img == 0:
            return x
        img = self.encode_images(images).to(x.dtype).reshape(-1, x.shape[-1])
        # Row-major order of the mask = reading order of the images, as the data lists them.
        return x.masked_scatter(mask.unsqueeze(-1), img)

    def forward(self, input_ids: Tensor, images: Tensor | None = None, *, kv_cache: Any = None,
                return_hidden: bool = False, return_aux: bool = False) -> Any:
        """The decoder's output (logits [B, T, V] by default) on text with images spliced in (see Transformer)."""
        embeds = self.embed_inputs(input_ids, images)
        return self.decoder(input_ids, inputs_embeds=embeds, kv_cache=kv_cache, return_hidden=return_hidden,
                            return_aux=return_aux)

    def new_cache(self, batch: int, max_len: int | None = None) -> Any:
        """An empty KV cache of the decoder."""
        return self.decoder.new_cache(batch, max_len)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, images: Tensor | None = None, max_new_tokens: int = 8, *,
                 temperature: float = 0.0, top_k: int | None = None, use_cache: bool = True,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Prompt [B, T] (+ its images) followed by up to max_new_tokens text tokens [B, T + new]; the image ids are
        never generated. With the cache, the prompt (image tokens included) is encoded once."""
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt length {input_ids.shape[1]} (image tokens included) + max_new_tokens "
                             f"{max_new_tokens} = {total} exceeds max_seq_len={self.config.max_seq_len}")
        cache = self.new_cache(input_ids.shape[0], total) if use_cache else None
        seq = input_ids
        logits = self(input_ids, images, kv_cache=cache)[:, -1, :].float()
        for i in range(max_new_tokens):
            logits[:, self.text_vocab_size:] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, generator)
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            if (eos_id is not None and bool((nxt == eos_id).all())) or i == max_new_tokens - 1:
                break
            if use_cache:
                logits = self(nxt[:, None], None, kv_cache=cache)[:, -1, :].float()
            else:
                logits = self(seq, images)[:, -1, :].float()
        return seq

    # -- FLOPs --------------------------------------------------------------------------------------------------
    def image_flops(self) -> dict[str, float]:
        """Forward FLOPs per image of the encoder, its last stage and the projector (torch's FLOP counter)."""
        if self._image_flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            p = next(self.encoder.parameters())
            x = torch.zeros(1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
            stage = last_stage(self.encoder) if self.train_encoder == "last" else []
            seen: list[Tensor] = []
            hook = stage[0].register_forward_hook(lambda m, a, out: seen.append(a[0])) if stage else None
            was = self.training
            self.eval()
            try:
                with torch.no_grad():
                    with FlopCounterMode(display=False) as enc:
                        feats = self.pool(feature_tokens(self.encoder, x))
                    with FlopCounterMode(display=False) as proj:
                        self.projector(feats.to(self.projector_dtype))
                    last = 0.0
                    if stage:
                        with FlopCounterMode(display=False) as tail:
                            nn.Sequential(*stage)(seen[0])
                        last = float(tail.get_total_flops())
            finally:
                if hook is not None:
                    hook.remove()
                self.train(was)
            self._image_flops = {"encoder": float(enc.get_total_flops()), "encoder_last_stage": last,
                                 "projector": float(proj.get_total_flops())}
        return self._image_flops

    def training_flops_per_image(self) -> float:
        """Training FLOPs per image: the encoder's forward, plus backward (2 x forward) where it trains (all of it,
        or its last stage), plus the projector's forward and backward."""
        f = self.image_flops()
        encoder_backward = {"frozen": 0.0, "last": 2 * f["encoder_last_stage"], "full": 2 * f["encoder"]}
        return f["encoder"] + encoder_backward[self.train_encoder] + 3 * f["projector"]


def _multimodal_builder(encoder: str, decoder: str, encoder_overrides: dict[str, Any] | None = None,
                        decoder_overrides: dict[str, Any] | None = None, **defaults: Any):
    def build(**kwargs: Any) -> MultimodalDecoder:
        enc_ov = {**(encoder_overrides or {}), **(kwargs.pop("encoder_overrides", None) or {})}
        dec_ov = {**(decoder_overrides or {}), **(kwargs.pop("decoder_overrides", None) or {})}
        return MultimodalDecoder(**{"encoder": encoder, "decoder": decoder, **defaults, **kwargs},
                                 encoder_overrides=enc_ov, decoder_overrides=dec_ov)

    build.__doc__ = f"A multimodal decoder ({encoder} -> {decoder} by default); keywords: MultimodalDecoder's."
    return build


# Tiny CPU pairs (ours, not from a paper) for the digits tasks of zoo.data.interleaved: 32 px images, byte vocabulary.
_TINY_DECODER = dict(n_layers=2, d_model=128, d_ff=384, n_heads=2, n_kv_heads=1, head_dim=64, window=64,
                     max_seq_len=128)
NAMES = ("vlm-digits-tiny", "vlm-digits-resnet18", "vlm-digits-tiny-routed", "vlm")  # registered below
register("vlm-digits-tiny", _multimodal_builder("convnet_tiny", "gemma2-tiny", decoder_overrides=_TINY_DECODER))
register("vlm-digits-resnet18", _multimodal_builder("resnet18_cifar", "gemma2-tiny", decoder_overrides=_TINY_DECODER))
register("vlm-digits-tiny-routed", _multimodal_builder(
    "convnet_tiny", "gemma2-tiny", decoder_overrides=dict(_TINY_DECODER, ffn="routed", n_experts=4)))
# Any pairing: zoo.create("vlm", encoder="resnet50", decoder="gemma2-2b", ...).
register("vlm", _multimodal_builder("convnet_tiny", "gemma2-tiny"))
