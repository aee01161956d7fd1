"""BLIP-2 stage-1 objectives on a Q-Former: image-text contrastive (ITC), image-text matching with
hard negatives (ITM) and image-grounded text generation (ITG), with negatives from every rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from blipkit.distributed import current
from blipkit.errors import DataError

from .layers import ImageBlock, KeyValue, additive_mask, gather_rows
from .model import QFormer, QueryPass, TokenizedText, fp32

LABEL_SMOOTHING = 0.1
TEMP_RANGE = (0.001, 0.5)


@dataclass(frozen=True)
class Split:
    """How a global batch is spread over the ranks: each rank's number of rows, and which rank this is."""

    sizes: tuple[int, ...]
    rank: int = 0

    @property
    def world(self) -> int:
        """Number of ranks."""
        return len(self.sizes)

    @property
    def total(self) -> int:
        """Rows in the global batch."""
        return sum(self.sizes)

    @property
    def local(self) -> slice:
        """This rank's rows in the global batch."""
        start = sum(self.sizes[: self.rank])
        return slice(start, start + self.sizes[self.rank])


def batch_split(rows: int, device: torch.device) -> Split:
    """The split of the global batch of which this rank holds ``rows``; no collective on a world of one."""
    ranks = current()
    if not ranks.active:
        return Split((rows,))
    counts = torch.zeros(ranks.world, dtype=torch.long, device=device)
    counts[ranks.rank] = rows
    dist.all_reduce(counts)
    return Split(tuple(counts.tolist()), ranks.rank)


def all_gather_rows(x: torch.Tensor, split: Split) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated along dim 0 in rank order (``split.sizes`` rows each), without
    gradient; all dimensions but the first must agree across ranks."""
    if split.world == 1:
        return x
    longest = max(split.sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in split.sizes]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat([part[:rows] for part, rows in zip(parts, split.sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, split: Split) -> torch.Tensor:
        ctx.split = split
        return all_gather_rows(x, split)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss reads every rank's rows: this rank's rows get the sum of all their gradients.
        # gloo has no reduce_scatter, so the whole gradient is summed (in a copy: all_reduce works in place
        # and autograd may hold on to ``grad``) and this rank's slice kept.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.split.local], None


def gather_with_grad(x: torch.Tensor, split: Split | None = None) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated along dim 0 in rank order (rank counts may differ; ``split``
    from ``batch_split`` when known), differentiable across ranks: this rank's rows receive the summed
    gradient of every rank's use of them. On a world of one, ``x`` itself."""
    split = batch_split(x.shape[0], x.device) if split is None else split
    if split.world == 1:
        return x
    return _GatherWithGrad.apply(x, split)


def gather_padded(x: torch.Tensor, pad_value: int, split: Split | None = None) -> torch.Tensor:
    """Gather [B, T] tensors whose B and T differ across ranks, right-padding each to the longest T."""
    split = batch_split(x.shape[0], x.device) if split is None else split
    if split.world == 1:
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return all_gather_rows(F.pad(x, (0, int(length.item()) - x.shape[1]), value=pad_value), split)


def positive_mask(split: Split, image_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[local rows, global rows] True where a local sample and a gathered one form a positive pair: itself,
    and with ``image_ids`` every sample of the same image."""
    local = split.local
    columns = torch.arange(split.total, device=device)
    positives = columns[None, :] == torch.arange(local.start, local.stop, device=device)[:, None]
    if image_ids is not None:
        ids = image_ids.to(device).view(-1)
        positives = positives | (ids[:, None] == all_gather_rows(ids, split)[None, :])
    return positives


@torch.no_grad()
def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, start: int = 0) -> torch.Tensor:
    """One negative column per row, drawn from softmax(sim) with positives excluded; row i is the sample
    in column ``start + i`` (``start``: this rank's first row in the global batch).

    A row whose every column is a positive (all captions of one image) falls back to excluding only
    the pair itself, so that a different sample is always drawn.
    """
    if sim.shape[1] < 2:
        raise DataError("stage-1 ITM needs at least 2 image-text pairs per batch; raise the batch size")
    rows = torch.arange(sim.shape[0], device=sim.device)
    identity = torch.zeros_like(positives)
    identity[rows, start + rows] = True
    blocked = torch.where(positives.all(dim=1, keepdim=True), identity, positives)
    weights = sim.float().masked_fill(blocked, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1).squeeze(1)


def _itc(
    model: QFormer, image_feats: torch.Tensor, text_feat: torch.Tensor, positives: torch.Tensor, split: Split
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image_all = gather_with_grad(image_feats, split)
    text_all = gather_with_grad(text_feat, split)
    with torch.no_grad():
        model.temp.clamp_(*TEMP_RANGE)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_all).amax(dim=-1) / model.temp
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_all).amax(dim=-1) / model.temp
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    targets = (1 - LABEL_SMOOTHING) * targets + LABEL_SMOOTHING / targets.shape[1]
    loss = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
    return loss, sim_i2t, sim_t2i


def _negative_images(
    model: QFormer,
    image: torch.Tensor,
    queries: QueryPass,
    image_keep: torch.Tensor | None,
    negatives: torch.Tensor,
    split: Split,
) -> tuple[list[KeyValue | None], torch.Tensor | None]:
    """Cross-attention keys/values (and keep mask) of the negative images. On one rank they are rows
    of the query pass's own keys/values, so no image is projected twice."""
    if split.world == 1:
        kv = [None if pair is None else tuple(gather_rows(t, negatives) for t in pair) for pair in queries.image_kv]
        return kv, None if image_keep is None else image_keep[negatives]
    kv = model.project_normed(gather_with_grad(image, split)[negatives])
    keep = None if image_keep is None else gather_padded(image_keep, 0, split)[negatives]
    return kv, keep


@dataclass
class Texts:
    """Every rank's captions (right-padded to the longest) with their word embeddings, and this rank's rows."""

    ids: torch.Tensor
    mask: torch.Tensor
    words: torch.Tensor
    bos: torch.Tensor
    local: slice

    def mine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's (ids, mask, words)."""
        return self.ids[self.local], self.mask[self.local], self.words[self.local]


def embed_texts(model: QFormer, ids: torch.Tensor, mask: torch.Tensor, split: Split) -> Texts:
    """Gather the captions of every rank and look up all word embeddings the stage-1 passes need at once:
    each lookup's backward builds a dense vocabulary-sized gradient, so one lookup instead of three saves
    two of them per step."""
    ids_all = gather_padded(ids, model.tokenizer.pad_token_id, split)
    bos = ids_all.new_tensor([model.tokenizer.bos_token_id])
    flat = model.embeddings.word(torch.cat([ids_all.flatten(), bos]))
    words = flat[:-1].view(*ids_all.shape, -1)
    return Texts(ids_all, gather_padded(mask, 0, split), words, flat[-1], split.local)


def _itm(
    model: QFormer,
    image: torch.Tensor,
    queries: QueryPass,
    image_keep: torch.Tensor | None,
    texts: Texts,
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    split: Split,
) -> tuple[torch.Tensor, torch.Tensor]:
    neg_image = sample_hard_negatives(sim_t2i, positives, split.local.start)
    neg_text = sample_hard_negatives(sim_i2t, positives, split.local.start)
    rows = torch.arange(split.local.start, split.local.stop, device=texts.ids.device)
    # Rows: positive pairs, then each image with a negative text (both read the batch's own images, so
    # their queries attend to them together), then each text with a negative image.
    text_rows = torch.cat([rows, neg_text, rows])
    batch = rows.shape[0]

    neg_kv, neg_keep = _negative_images(model, image, queries, image_keep, neg_image, split)
    neg_mask = model.image_additive_mask(neg_keep)
    images = [
        None if own is None else [ImageBlock(own, queries.image_mask, repeats=2), ImageBlock(neg, neg_mask)]
        for own, neg in zip(queries.image_kv, neg_kv, strict=True)
    ]
    # Each text is paired with up to three images, but its first layer does not see them: run it once.
    unique, pairs = torch.unique(text_rows, return_inverse=True)
    ids, mask, words = texts.ids[unique], texts.mask[unique], texts.words.index_select(0, unique)
    hidden = model.pair_pass(ids, mask, images, words, queries_only=True, rows=pairs)
    logits = model.itm_head(hidden).mean(dim=1)
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).to(device=logits.device, dtype=torch.long)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return F.cross_entropy(logits, labels), accuracy.detach()


def _itg(model: QFormer, queries: QueryPass, texts: Texts, split: Split) -> torch.Tensor:
    """The captioning loss: the mean over this rank's caption tokens, or, over several ranks, rescaled so
    that the trainer's weighting of ranks by their rows gives the mean over every rank's tokens."""
    ids, mask, words = texts.mine()
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = model.tokenizer.bos_token_id
    decoder_words = torch.cat([texts.bos.expand(ids.shape[0], 1, -1), words[:, 1:]], dim=1)
    hidden = model.decoder_pass(decoder_ids, mask, queries.past, decoder_words)
    # Only positions whose next token is real text are scored: the vocabulary-wide head skips the padding.
    scored = mask[:, 1:].bool()
    logits = model.lm_head(hidden[:, :-1][scored], model.embeddings.word.weight)
    loss = F.cross_entropy(logits, decoder_ids[:, 1:][scored], label_smoothing=LABEL_SMOOTHING)
    if split.world == 1:
        return loss
    token_share = scored.sum().to(loss.dtype) / texts.mask[:, 1:].sum().to(loss.dtype)
    return loss * token_share * (split.total / split.sizes[split.rank])


def _spell(model: QFormer, queries: QueryPass, texts: Texts) -> torch.Tensor:
    """The spelling loss: query k's output, through the LM head, predicts word token ``k mod T`` of its
    caption (T real tokens between [CLS] and [SEP]); the mean over this rank's rows, each with one target
    per query (captions with no word are left out)."""
    ids, mask, _ = texts.mine()
    words = mask.sum(dim=1) - 2
    positions = 1 + torch.arange(model.num_queries, device=ids.device)[None] % words.clamp_min(1)[:, None]
    targets = ids.gather(1, positions).masked_fill((words < 1)[:, None], -100)
    logits = model.lm_head(queries.hidden, model.embeddings.word.weight)
    if not bool((targets != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def stage1_losses(
    model: QFormer,
    image_tokens: torch.Tensor,
    tokens: dict[str, torch.Tensor],
    image_mask: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The sum of ``model.objectives`` (ITC, ITM, ITG, spelling) on one batch of encoder tokens and tokenized captions
    (row-aligned), with each loss alone and ITM's accuracy when ITM is one of them."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if ids.shape[0] != image_tokens.shape[0]:
        raise DataError(f"stage 1 got {image_tokens.shape[0]} images but {ids.shape[0]} captions; pair them one to one")
    wanted = model.objectives
    image, image_kv = model.project_image(image_tokens)
    image_keep = None if image_mask is None else image_mask.to(torch.bool)
    queries = model.query_pass(image_kv, None if image_keep is None else additive_mask(image_keep)[:, None, None, :])
    split = batch_split(ids.shape[0], ids.device)
    texts = embed_texts(model, ids, mask, split)

    losses: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}
    if "itc" in wanted or "itm" in wanted:
        # ITM mines its hard negatives from ITC's similarities, so it needs them even when ITC does not train.
        with torch.set_grad_enabled(torch.is_grad_enabled() and "itc" in wanted):
            image_feats = F.normalize(model.vision_proj(queries.hidden), dim=-1)
            text_feat = F.normalize(model.text_proj(model.text_pass(*texts.mine(), cls_only=True)[:, 0]), dim=-1)
            positives = positive_mask(split, image_ids, ids.device)
            itc, sim_i2t, sim_t2i = _itc(model, image_feats, text_feat, positives, split)
        if "itc" in wanted:
            losses["itc"] = itc
        if "itm" in wanted:
            sims = sim_i2t.detach(), sim_t2i.detach()
            losses["itm"], metrics["itm_acc"] = _itm(model, image, queries, image_keep, texts, *sims, positives, split)
    if "itg" in wanted:
        losses["itg"] = _itg(model, queries, texts, split)
    if "spell" in wanted:
        losses["spell"] = _spell(model, queries, texts)
    return {"loss": sum(losses.values()), **losses, **metrics}


def stage1_loss(
    model: QFormer,
    image_tokens: torch.Tensor,
    text: Sequence[str] | TokenizedText,
    image_mask: torch.Tensor | None = None,
    image_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """BLIP-2 stage 1 on a Q-Former: ``loss`` (the sum of its ``objectives``), each of them by name, and
    ``itm_acc`` when ITM trains, for captions as strings or as the Q-Former's tokens. ``image_ids`` [B]
    marks captions of the same image as positives for ITC and keeps them out of the ITM negatives."""
    tokens = model.as_tokenized(text)
    with fp32(image_tokens.device):
        return stage1_losses(model, image_tokens, tokens, image_mask, image_ids)
