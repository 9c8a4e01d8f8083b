"""The one place that knows what a condition is: none, class or text.

Everything outside this module (the training loop, validation, the sampler, predict, evaluate,
diagnose) asks a `Conditioning` object and never branches on the kind:

    seam = conditioning_for_training(cfg, dataset, device, log)   # stage 2 setup (text: loads the encoder)
    seam.prepare(captions_fn, cache_dir, dist, log, batch_size)    # text: the embedding cache, once
    seam = conditioning_from_checkpoint(ckpt, where, device, text_encoder_path, subfolder, dtype)
    seam.kind, seam.reads           -> "none" | "class" | "text"; dataset item keys it needs
    seam.dims()                     -> VideoDiT keyword arguments (num_classes / text_dim, pooled_dim)
    seam.record()                   -> what the checkpoint keeps under "conditioning"
    seam.check_checkpoint(ckpt, p)  -> refuse a checkpoint made with another condition / encoder
    seam.train_kwargs(batch, device, gen) -> model(x_t, t, **kwargs) in the training step,
                                          caption dropout drawn from `gen` (resumable)
    seam.eval_kwargs(batch, device) -> the same without dropout (held-out loss, diagnose)
    seam.samples(n, labels=, prompts=, negative_prompt=) -> SampleConditions: cond / uncond rows
                                       of n videos and each video's prompt (prompts.txt, TensorBoard)
    seam.summary(), seam.guidance_note(scale) -> log / predict lines

`SampleConditions.rows(a, b, device)` gives the (cond, uncond) keyword dicts of videos a..b,
which `models.diffusion.sample` batches for classifier-free guidance: uncond has the same keys
as cond, so the two halves are concatenated key by key into one forward pass.

Kinds:
- none: no keyword; guidance has nothing to contrast, so it is off (said at predict).
- class: `y` (B,) from the dataset's `label`; the null is the model's learned null class row
  (`null_class_id`), used for label dropout inside the DiT (model.class_dropout) and for the
  uncond half. Numbers are exactly those of the older class path.
- text: the dataset's `caption` strings looked up in a `TextEmbeddingCache` built ONCE before
  training by the frozen `FrozenTextEncoder` over every distinct caption (train and val splits,
  validation.prompts): rank 0 encodes what is missing, the other ranks read it after a barrier.
  The training step never runs the encoder (a caption missing from the table is an error).
  The null condition is the DiT's LEARNED null token (models/dit.py explains why): dropping a
  caption is `drop_text = True` (its tokens masked, the null token left), drawn at
  model.caption_dropout from the run's checkpointed generator, so a resumed run drops the same
  captions. The uncond half of guidance is the same null (`drop_text` all True), or an ordinary
  caption: the negative prompt.

First frames (image-to-video, extension) are not a fourth kind but an aspect orthogonal to
these three, combinable with each: `training/first_frames.py` (`FirstFrames`, held beside the
seam as `Stage2.first_frames`; recorded by the model config's first_frame_conditioning /
condition_frames), which changes x_t, t and the loss mask rather than the model's keywords.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from models.backbones import MASKED, TextConvention, convention_of
from utils.errors import UserError

Kwargs = dict  # keyword arguments of VideoDiT.forward besides (x, t): batch-first tensors
KINDS = ("none", "class", "text")
TEXT_CACHE_DIR = "text_cache"  # in the run directory, beside latent_cache/


@dataclass
class SampleConditions:
    """The conditions of n videos to sample: `cond` and `uncond` (None: no guidance possible)
    hold n rows per tensor; `prompts[i]` is video i's prompt ("" for a model without text):
    the line of prompts.txt and the TensorBoard text beside the samples."""
    cond: Kwargs
    uncond: Optional[Kwargs]
    prompts: list[str] = field(default_factory=list)

    def rows(self, start: int, stop: int, device: torch.device) -> tuple[Kwargs, Optional[Kwargs]]:
        """(cond, uncond) of videos start..stop-1 on `device`."""
        def cut(kw: Optional[Kwargs]) -> Optional[Kwargs]:
            return None if kw is None else {k: v[start:stop].to(device) for k, v in kw.items()}
        return cut(self.cond), cut(self.uncond)

    def select(self, index: Sequence[int]) -> "SampleConditions":
        """The conditions of videos `index` (e.g. one rank's share)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        def pick(kw: Optional[Kwargs]) -> Optional[Kwargs]:
            return None if kw is None else {k: v[idx] for k, v in kw.items()}
        return SampleConditions(pick(self.cond), pick(self.uncond), [self.prompts[i] for i in index] if self.prompts else [])


def _refuse_text(kind: str, prompts: Optional[Sequence[str]], negative_prompt: Optional[str]) -> None:
    """Prompts and negative_prompt are for text checkpoints: a `kind` model is told to remove
    them (never to give prompts, which it would refuse too)."""
    what = "class-conditional" if kind == "class" else f"not text-conditioned (model.conditioning = {kind})"
    if prompts:
        instead = "use class_labels instead of prompts / prompts_file" if kind == "class" else \
            "remove prompts / prompts_file"
        raise UserError(f"prompts are set but this checkpoint's model is {what}; {instead}")
    if negative_prompt is not None:
        raise UserError(f"negative_prompt is set but this checkpoint's model is {what}; remove negative_prompt "
                        "(it is the unconditional half of guidance for text models)")


def _cycled(values: Sequence, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


class Conditioning:
    """No condition (`model.conditioning: none`): the base every kind refines."""
    kind = "none"
    reads: tuple[str, ...] = ()  # the dataset item keys a condition is made of

    def dims(self) -> dict:
        """VideoDiT keyword arguments that follow from the condition."""
        return {"num_classes": 0}

    def record(self) -> dict:
        return {"kind": self.kind}

    def check_checkpoint(self, ckpt: dict, where: str) -> None:
        recorded = checkpoint_kind(ckpt)
        if recorded != self.kind:
            raise UserError(f"{where} was trained with model.conditioning = {recorded}, but this run "
                            f"has {self.kind}; use the conditioning it was trained with")

    def prepare(self, captions: Callable[[], Sequence[str]], cache_dir: str, dist, log,
                batch_size: int = 64) -> None:
        """Before training: encode and cache what the training step will look up (text)."""

    def collate(self, items: list[dict]) -> dict:
        """The DataLoader's collate: torch's default, with captions kept as a list of strings."""
        from torch.utils.data import default_collate
        return default_collate(items)

    def train_kwargs(self, batch: dict, device: torch.device, gen: Optional[torch.Generator]) -> Kwargs:
        return {}

    def eval_kwargs(self, batch: dict, device: torch.device) -> Kwargs:
        return {}

    def samples(self, n: int, *, labels: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None,
                negative_prompt: Optional[str] = None, guidance_scale: float = 1.0) -> SampleConditions:
        if labels:
            raise UserError("class_labels is set but this checkpoint's model is unconditional; "
                            "remove class_labels")
        _refuse_text(self.kind, prompts, negative_prompt)
        return SampleConditions({}, None, [""] * n)

    def guidance_note(self, guidance_scale: float) -> str:
        if guidance_scale == 1.0:
            return "guidance 1"
        return f"no guidance (guidance_scale = {guidance_scale} needs a class- or text-conditional model)"

    def summary(self) -> str:
        return "unconditional"


class ClassConditioning(Conditioning):
    """Class labels (a folder name per clip); the null is the model's null class row."""
    kind = "class"
    reads = ("label",)

    def __init__(self, num_classes: int, class_names: Sequence[str] = ()):
        self.num_classes, self.class_names = num_classes, list(class_names)

    def dims(self) -> dict:
        return {"num_classes": self.num_classes}

    def record(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "class_names": list(self.class_names)}

    def train_kwargs(self, batch: dict, device: torch.device, gen: Optional[torch.Generator]) -> Kwargs:
        # label dropout happens inside the DiT (LabelEmbedder, model.class_dropout), as before
        return {"y": torch.as_tensor(batch["label"]).to(device)}

    def eval_kwargs(self, batch: dict, device: torch.device) -> Kwargs:
        return {"y": torch.as_tensor(batch["label"]).to(device)}

    def samples(self, n: int, *, labels: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None,
                negative_prompt: Optional[str] = None, guidance_scale: float = 1.0) -> SampleConditions:
        _refuse_text(self.kind, prompts, negative_prompt)
        for label in labels or []:
            if not 0 <= label < self.num_classes:
                names = ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names)) or \
                    f"0..{self.num_classes - 1}"
                raise UserError(f"class_labels contains {label}: this model knows classes {names}")
        y = torch.tensor(_cycled(list(labels) if labels else list(range(self.num_classes)), n), dtype=torch.long)
        return SampleConditions({"y": y}, {"y": torch.full_like(y, self.num_classes)}, [""] * n)

    def guidance_note(self, guidance_scale: float) -> str:
        return f"guidance {guidance_scale}"

    def summary(self) -> str:
        return f"{self.num_classes} classes"


class TextConditioning(Conditioning):
    """Captions through a frozen text encoder, embedded once (cache) or at predict (prompts).

    The `convention` (models/backbones.py `TextConvention`, the DiT family's) says how captions
    are encoded and what the null caption is: the repo's DiT reads masked tokens trimmed to a
    batch's longest caption and owns a learned null token (`drop_text`); a pretrained family
    reads a fixed number of tokens without a mask, and its null is the encoding of "" (a
    dropped caption is replaced by it, guidance's uncond half is it, as in its pipeline)."""
    kind = "text"
    reads = ("caption",)

    def __init__(self, encoder_record: dict, caption_dropout: float = 0.0, table=None, encoder=None,
                 convention: Optional[TextConvention] = None, load_encoder: Optional[Callable] = None):
        """`encoder_record`: the encoder's describe(); `table`: a TextTable of every caption the
        run uses (training); `encoder`: the FrozenTextEncoder itself (predict: prompts are
        encoded when asked); `load_encoder()`: loads it where it is needed and not held (a rank
        with captions to encode)."""
        self.encoder_record, self.caption_dropout = encoder_record, caption_dropout
        self.table, self.encoder, self.load_encoder = table, encoder, load_encoder
        self.convention = convention or convention_of(encoder_record.get("convention"))
        if not self.convention.model_mask and self.convention.length is None:  # the encoder's length
            self.convention = dataclasses.replace(self.convention, length=int(encoder_record["max_length"]))
        self.cache = None  # the TextEmbeddingCache `prepare` built (its encoded / reused counts)
        self.encoded = 0  # captions encoded by this object (not from the table)
        self.encoded_here = 0  # captions this process encoded for the cache (`prepare`)

    @property
    def null_is_empty(self) -> bool:
        return self.convention.null == "empty"

    def dims(self) -> dict:
        return {"num_classes": 0, "text_dim": int(self.encoder_record["hidden_size"]),
                "pooled_dim": int(self.encoder_record.get("pooled_size") or 0)}

    def record(self) -> dict:
        return {"kind": self.kind, "text_encoder": {**self.encoder_record, "convention": self.convention.record()}}

    def check_checkpoint(self, ckpt: dict, where: str) -> None:
        super().check_checkpoint(ckpt, where)
        recorded = ckpt.get("conditioning", {}).get("text_encoder") or {}
        from models.text_encoder import check_text_encoder
        check_text_encoder(recorded, _RecordView(self.encoder_record), where, resume=True)

    def prepare(self, captions: Callable[[], Sequence[str]], cache_dir: str, dist, log,
                batch_size: int = 64) -> None:
        """Every caption of `captions()` (train and val splits, validation prompts, and "" when
        it is the null) encoded once into the TextEmbeddingCache in `cache_dir`, the encoding
        shared over the ranks as the latent cache's: rank 0 checks the cache and lists what is
        missing, each rank encodes its share into shards of its own (loading the encoder only if
        it has a share), rank 0 adds them to the manifest, every rank reads the table. The waits
        between are the setup group's (train.setup_timeout_minutes), not the training
        collectives' timeout. The encoder is then released: the training step only looks
        captions up."""
        from data.text_cache import TextEmbeddingCache, text_cache_key
        from utils.dist import barrier, gather_dicts, gather_objects
        texts = sorted(set(captions()) | ({""} if self.null_is_empty else set()))
        r = self.encoder_record
        cache = TextEmbeddingCache(cache_dir, text_cache_key(r["fingerprint"], r["max_length"], r["dtype"],
                                                             self.convention.name), log=log.info)
        missing = cache.missing(texts) if dist.is_main else None
        missing = gather_objects(missing, dist, setup=True)[0]  # rank 0's list, on every rank
        share = missing[dist.rank::dist.world_size]
        parts = {}
        if share:
            encoder = self.encoder if self.encoder is not None else self.load_encoder()
            parts = cache.build_part(share, lambda batch: tuple(encoder.encode(batch)), dist.rank,
                                     dist.world_size, batch_size, progress=dist.is_main)
            self.encoded_here = len(share)
        parts = gather_dicts(parts, dist, setup=True)
        if dist.is_main:
            cache.add_shards(parts)
            cache.encoded, cache.reused = len(missing), len(texts) - len(missing)
            log.info(f"text cache {cache.dir}: {len(texts)} distinct captions, {len(missing)} encoded "
                     f"now, {len(texts) - len(missing)} reused (encoding shared by {dist.world_size} process(es))")
        barrier(dist, setup=True)
        self.table = cache.load(texts)
        device = self.encoder.device if self.encoder is not None else None
        self.cache, self.encoder, self.load_encoder = cache, None, None  # frozen and done: its memory goes back
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()

    def _lookup(self, texts: Sequence[str]) -> Kwargs:
        """Captions -> the model's text keywords on CPU, from the table when it has them all,
        else (predict, evaluate) from the encoder."""
        texts = list(texts)
        if self.table is not None and all(t in self.table for t in texts):
            tokens, mask, pooled = self.table.lookup(texts, trim=self.convention.model_mask)
        elif self.encoder is None:
            missing = next(t for t in texts if self.table is None or t not in self.table)
            raise KeyError(f"caption {missing!r} is not in the text embedding cache and no encoder is "
                           "loaded: every caption a run uses is encoded before training")
        else:
            out = self.encoder.encode(texts)
            tokens, mask, pooled = out.tokens.cpu(), out.mask.cpu(), out.pooled
            pooled = None if pooled is None else pooled.cpu()
            self.encoded += len(texts)
            if self.convention.model_mask:  # the padding the mask would hide: not computed at all
                longest = max(int(mask.sum(1).max()), 1)
                tokens, mask = tokens[:, :longest], mask[:, :longest]
        kw = {"text": tokens}
        if self.convention.model_mask:
            kw["text_mask"] = mask
        if pooled is not None:
            kw["pooled"] = pooled
        return kw

    def embed(self, texts: Sequence[str], device: torch.device) -> Kwargs:
        """Captions -> text (and text_mask, pooled, as the DiT reads them) on `device`."""
        return {k: v.to(device) for k, v in self._lookup(texts).items()}

    def collate(self, items: list[dict]) -> dict:
        """The DataLoader's collate: the batch, with its captions looked up in the table (in the
        data workers, trimmed to the batch's longest caption for a DiT that reads a mask), so
        the training step only moves them to the device."""
        batch = super().collate(items)
        if self.table is not None and "caption" in batch:
            batch["text_kwargs"] = self._lookup(batch["caption"])
        return batch

    def _kwargs(self, batch: dict, device: torch.device) -> Kwargs:
        looked_up = batch.get("text_kwargs")
        if looked_up is None:
            return self.embed(batch["caption"], device)
        return {k: v.to(device, non_blocking=True) for k, v in looked_up.items()}

    def train_kwargs(self, batch: dict, device: torch.device, gen: Optional[torch.Generator]) -> Kwargs:
        kw = self._kwargs(batch, device)
        n = kw["text"].shape[0]
        if gen is not None and self.caption_dropout > 0:  # drawn from the run's generator: resumable
            drop = torch.rand(n, device=gen.device, generator=gen).to(device) < self.caption_dropout
        else:
            drop = torch.zeros(n, dtype=torch.bool, device=device)
        return self._dropped(kw, drop)

    def eval_kwargs(self, batch: dict, device: torch.device) -> Kwargs:
        kw = self._kwargs(batch, device)
        return self._dropped(kw, torch.zeros(kw["text"].shape[0], dtype=torch.bool, device=device))

    def _dropped(self, kw: Kwargs, drop: torch.Tensor) -> Kwargs:
        """The keywords with the captions `drop` (B,) bool replaced by the null: the learned null
        (`drop_text`, the DiT masks them), or the encoding of "" put in their place."""
        if not self.null_is_empty:
            return {**kw, "drop_text": drop}  # (B,) True: the null caption (the DiT never draws its own)
        empty = self.embed([""], kw["text"].device)
        return {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty[k], v) for k, v in kw.items()}

    def samples(self, n: int, *, labels: Optional[Sequence[int]] = None, prompts: Optional[Sequence[str]] = None,
                negative_prompt: Optional[str] = None, guidance_scale: float = 1.0) -> SampleConditions:
        if labels:
            raise UserError("class_labels is set but this checkpoint's model is text-conditioned; "
                            "give prompts (or prompts_file) instead")
        if not prompts:
            raise UserError("this checkpoint's model is text-conditioned: give prompts: [...] (one "
                            "per video, cycled) or prompts_file: a file with one prompt per line")
        names = _cycled(list(prompts), n)
        if negative_prompt is None and self.null_is_empty:
            negative_prompt = ""  # the family's null: the encoding of the empty prompt
        distinct = sorted(set(names) | ({negative_prompt} if negative_prompt is not None else set()))
        emb = self.embed(distinct, torch.device("cpu"))
        where = {t: i for i, t in enumerate(distinct)}
        rows = torch.tensor([where[t] for t in names], dtype=torch.long)
        cond = {k: v[rows] for k, v in emb.items()}
        if negative_prompt is not None:  # an ordinary caption (or "") as the uncond half
            uncond = {k: v[torch.full_like(rows, where[negative_prompt])] for k, v in emb.items()}
        else:  # the learned null: the same tensors with every caption dropped
            uncond = {**cond, "drop_text": torch.ones(n, dtype=torch.bool)}
        if not self.null_is_empty:
            cond["drop_text"] = torch.zeros(n, dtype=torch.bool)
            uncond.setdefault("drop_text", torch.zeros(n, dtype=torch.bool))
        return SampleConditions(cond, uncond, names)

    def guidance_note(self, guidance_scale: float) -> str:
        return f"guidance {guidance_scale}"

    def summary(self) -> str:
        r = self.encoder_record
        null = 'the encoding of ""' if self.null_is_empty else "learned"
        return (f"text ({r.get('class_name')} {r.get('fingerprint')}, {r.get('max_length')} tokens, "
                f"{self.convention.name}, null {null})")


class _RecordView:
    """A describe() record seen as an encoder by check_text_encoder (resume compares records)."""

    def __init__(self, record: dict):
        self.fingerprint, self.max_length = record.get("fingerprint"), record.get("max_length")
        self.parts, self.class_name = record.get("parts") or {}, record.get("class_name")
        self.path = record.get("path")
        self.attend_padding = bool(record.get("attend_padding", False))


# ----------------------------------------------------------------------------- building


def seam_of(ckpt: dict) -> type:
    """The Conditioning class a checkpoint was trained with (what it reads: `reads`), unbuilt."""
    return {"none": Conditioning, "class": ClassConditioning, "text": TextConditioning}[checkpoint_kind(ckpt)]


def checkpoint_kind(ckpt: dict) -> str:
    """The condition a checkpoint was trained with; older ones (no "conditioning" entry) from dims."""
    recorded = ckpt.get("conditioning")
    if isinstance(recorded, dict) and recorded.get("kind") in KINDS:
        return recorded["kind"]
    dims = (ckpt.get("model") or {}).get("dims") or {}
    if dims.get("text_dim"):
        return "text"
    return "class" if dims.get("num_classes") else "none"


def conditioning_for_training(cfg, dataset, device: torch.device, log, dist=None,
                              convention: TextConvention = MASKED, text_length: Optional[int] = None,
                              default_length: Optional[int] = None) -> Conditioning:
    """The seam of a training run (`cfg`: TrainRunConfig; `dataset`: its training split), cheap:
    text loads the frozen encoder from text_encoder.path on rank 0 only (for its sizes and
    fingerprint, which a resumed checkpoint is checked against; the other ranks get its record
    and load it in `prepare` only if they have captions to encode). `convention`,
    `text_length` (text_encoder.max_length) and `default_length` (its fallback) are the DiT
    family's (models/backbones.py)."""
    from utils.dist import DistInfo, gather_objects
    dist = dist or DistInfo()
    kind = cfg.model.resolved().conditioning
    if kind == "class" and dataset.num_classes > 0:
        return ClassConditioning(dataset.num_classes, list(getattr(dataset, "class_names", [])))
    if kind != "text":  # none, or class on data without labels (unconditional, as always)
        return Conditioning()
    if not getattr(dataset, "has_captions", False):
        raise UserError("model.conditioning = text but the clips have no captions: set data.captions "
                        "(sidecar, or a .csv / .jsonl / .json metadata file), or data.builtin.captions: "
                        "true for the built-in clips")
    from models.text_encoder import FrozenTextEncoder

    def load():
        return FrozenTextEncoder.from_config(cfg.text_encoder, device, max_length=text_length,
                                             attend_padding=not convention.encoder_mask,
                                             default_length=default_length)
    encoder = load() if dist.is_main else None
    if encoder is not None:
        log.info(f"text encoder {encoder.summary()}")
    record = gather_objects(None if encoder is None else encoder.describe(), dist, setup=True)[0]

    def load_checked():  # a rank with captions to encode: the encoder rank 0 described
        return FrozenTextEncoder.from_record(record, "rank 0's text encoder", device,
                                             path=cfg.text_encoder.path, subfolder=cfg.text_encoder.subfolder)
    return TextConditioning(record, cfg.model.caption_dropout, None, encoder, convention, load_checked)


def conditioning_from_checkpoint(ckpt: dict, where: str, device: torch.device,
                                 text_encoder_path: Optional[str] = None,
                                 text_encoder_subfolder: Optional[str] = None,
                                 text_encoder_dtype: str = "auto") -> Conditioning:
    """The seam a checkpoint was trained with, for sampling (predict, evaluate, diagnose). Text:
    the encoder the checkpoint records (or the one at `text_encoder_path`, which must be the
    same: check_text_encoder names what differs), in the recorded dtype unless another is asked
    for (said: the embeddings then differ slightly from training's), encoding and null as the
    recorded convention."""
    kind = checkpoint_kind(ckpt)
    if kind == "class" and int(ckpt["model"]["dims"].get("num_classes", 0)) > 0:
        return ClassConditioning(int(ckpt["model"]["dims"]["num_classes"]), ckpt.get("class_names", []))
    if kind == "class":
        return Conditioning()
    if kind == "none":
        return Conditioning()
    from models.text_encoder import FrozenTextEncoder
    record = ckpt.get("conditioning", {}).get("text_encoder")
    if not isinstance(record, dict):
        raise UserError(f"{where} is a text model but records no text encoder (entry "
                        "'conditioning.text_encoder'); it was written by other code")
    encoder = FrozenTextEncoder.from_record(record, where, device, text_encoder_dtype,
                                            path=text_encoder_path, subfolder=text_encoder_subfolder)
    record = {k: v for k, v in record.items() if k != "convention"}
    return TextConditioning(record, 0.0, None, encoder, convention_of(ckpt["conditioning"]["text_encoder"].get("convention")))
