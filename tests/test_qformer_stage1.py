"""Stage-1 objectives: ITC/ITM/ITG against direct recomputations, masks, hard negatives, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blipkit.errors import BlipkitError, ConfigError
from blipkit.plugins.bridges.qformer import objectives
from blipkit.plugins.bridges.qformer.layers import Attention, ImageBlock, additive_mask
from blipkit.plugins.bridges.qformer.model import QFormer
from blipkit.plugins.bridges.qformer.objectives import stage1_loss

SIZES = dict(num_queries=4, num_layers=4, hidden_size=32, num_heads=4, intermediate_size=64, max_position_embeddings=64)
CAPTIONS = [
    "a red circle on the left", "a blue square", "two green triangles", "a yellow star at the top",
    "a small purple circle", "an orange square in the corner", "a big blue triangle", "a white star",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread: synchronising two costs more than their matmuls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> QFormer:
    return QFormer(input_dim=24, tokenizer="char", embed_dim=16, **{**SIZES, **overrides})


def _unilm_itg_hidden(
    model: QFormer, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """ITG the LAVIS-paper way, in one pass over [queries | text] with a multimodal causal mask."""
    _, kv = model.project_image(image_tokens)
    batch, length, q = ids.shape[0], ids.shape[1], model.num_queries
    hidden = model.embeddings(queries=model.query_tokens.expand(batch, -1, -1), input_ids=ids)
    keep = torch.zeros(batch, q + length, q + length, dtype=torch.bool)
    keep[:, :q, :q] = True
    keep[:, q:, :q] = True
    keep[:, q:, q:] = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, :]
    return model._run(hidden, q, additive_mask(keep)[:, None], None, model.image_blocks(kv, None))[0][:, q:]


def _dec_ids(model: QFormer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.tokenize(texts)
    ids = tokens["input_ids"].clone()
    ids[:, 0] = model.tokenizer.bos_token_id
    return ids, tokens["attention_mask"]


def test_itg_with_cached_queries_equals_single_multimodal_pass() -> None:
    model = tiny().eval()
    image_tokens = torch.randn(3, 7, 24)
    ids, mask = _dec_ids(model, CAPTIONS[:3])
    with torch.no_grad():
        _, kv = model.project_image(image_tokens)
        cached = model.decoder_pass(ids, mask, model.query_pass(kv, None).past)
        reference = _unilm_itg_hidden(model, image_tokens, ids, mask)
    valid = mask.bool()
    assert (cached[valid] - reference[valid]).abs().max() < 1e-5


def test_itg_is_causal_and_sees_the_image() -> None:
    model = tiny().eval()
    image_tokens = torch.randn(2, 7, 24)
    ids, mask = _dec_ids(model, ["abcdefgh", "hgfedcba"])
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 3) % len(model.tokenizer)
    with torch.no_grad():
        _, kv = model.project_image(image_tokens)
        past = model.query_pass(kv, None).past
        before = model.decoder_pass(ids, mask, past)
        after = model.decoder_pass(changed, mask, past)
        _, other_kv = model.project_image(torch.randn(2, 7, 24))
        other_image = model.decoder_pass(ids, mask, model.query_pass(other_kv, None).past)
    assert (before[:, :5] - after[:, :5]).abs().max() == 0
    assert (before[:, 5:] - after[:, 5:]).abs().max() > 1e-4
    assert (before[:, 0] - other_image[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("adapted", [False, True], ids=["linear", "lora"])
def test_image_keys_values_and_gradients_equal_ln_vision_then_projection(adapted: bool) -> None:
    """ln_vision's affine is folded into the key/value weights; values and every gradient must equal the
    plain ln_vision -> Linear computation (float64; peft-wrapped projections take the unfolded path)."""
    from blipkit.model.lora import LoraSettings, apply_bridge_lora

    model = tiny(dropout=0.0).double()
    if adapted:
        apply_bridge_lora(model, LoraSettings(r=2, alpha=4, dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)
    with torch.no_grad():
        model.ln_vision.weight.normal_()
        model.ln_vision.bias.normal_()
    image_tokens = torch.randn(3, 7, 24, dtype=torch.float64)
    weights = torch.randn(3, 4, 7, 8, dtype=torch.float64)

    def gradients(kv: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = torch.stack([torch.stack(pair) for pair in kv if pair is not None])
        model.zero_grad(set_to_none=True)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    folded, folded_grads = gradients(model.project_image(image_tokens)[1])
    image = model.ln_vision(image_tokens)
    layers = [layer.cross_attn for layer in model.layers]
    plain, plain_grads = gradients([None if a is None else a.project_kv(image) for a in layers])
    assert torch.allclose(folded, plain, atol=1e-12)
    assert folded_grads.keys() == plain_grads.keys()
    assert "ln_vision.weight" in folded_grads and "ln_vision.bias" in folded_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(folded_grads[name], grad, atol=1e-10), name


def test_rows_sharing_an_image_attend_together_as_if_each_had_a_copy() -> None:
    """ITM's row blocks: outputs, maps and gradients equal attending row by row to copied keys/values (float64)."""
    attention = Attention(16, 4, 24, dropout=0.0, eps=1e-12).double()
    images = torch.randn(3, 7, 24, dtype=torch.float64)
    keep = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    mask = additive_mask(keep, torch.float64)[:, None, None, :]
    negatives = torch.tensor([2, 0, 0])
    hidden = torch.randn(9, 5, 16, dtype=torch.float64)
    upstream = torch.randn(9, 5, 16, dtype=torch.float64)

    def run(blockwise: bool, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        attention.zero_grad(set_to_none=True)
        kv = attention.project_kv(images)
        neg_kv = tuple(t[negatives] for t in kv)
        if blockwise:
            blocks = [ImageBlock(kv, mask, repeats=2), ImageBlock(neg_kv, mask[negatives])]
            out, weights = attention.read(hidden, blocks, need_weights)
        else:
            copied = tuple(torch.cat([t, t, n]) for t, n in zip(kv, neg_kv, strict=True))
            out, weights = attention(hidden, copied, torch.cat([mask, mask, mask[negatives]]), need_weights)
        (out * upstream).sum().backward()
        return out.detach(), weights, [p.grad.clone() for p in attention.parameters()]

    for need_weights in (False, True):
        out, weights, grads = run(True, need_weights)
        ref, ref_weights, ref_grads = run(False, need_weights)
        assert torch.allclose(out, ref, atol=1e-12)
        assert all(torch.allclose(g, r, atol=1e-10) for g, r in zip(grads, ref_grads, strict=True))
        if need_weights:
            assert torch.allclose(weights, ref_weights, atol=1e-12)
            assert weights[4, :, :, 5:].abs().max() == 0
    blocks = [ImageBlock(attention.project_kv(images), mask, repeats=3)]
    with pytest.raises(ValueError, match="cover 9 rows"):
        attention.read(hidden[:8], blocks)


@pytest.mark.parametrize("queries_only", [False, True])
def test_pair_pass_over_text_rows_equals_pass_over_copied_texts(queries_only: bool) -> None:
    """ITM pairs each text with several images and runs the text's first layer once; real positions' outputs
    and every gradient must equal a pass over copies of the texts (float64)."""
    model = tiny(dropout=0.0).double()
    tokens = model.tokenize(CAPTIONS[:3])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    rows = torch.tensor([0, 1, 2, 2, 0, 1, 0])
    image_tokens = torch.randn(7, 7, 24, dtype=torch.float64)
    image_mask = model.image_additive_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4] * 2 + [[1] * 7]))
    keep = torch.cat([torch.ones(7, model.num_queries, dtype=torch.long), mask[rows]], dim=1).bool()
    if queries_only:
        keep = keep[:, : model.num_queries]
    upstream = torch.randn(int(keep.sum()), model.hidden_size, dtype=torch.float64)

    def run(expanded: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        image = model.image_blocks(model.project_image(image_tokens)[1], image_mask)
        if expanded:
            out = model.pair_pass(ids, mask, image, queries_only=queries_only, rows=rows)
        else:
            out = model.pair_pass(ids[rows], mask[rows], image, queries_only=queries_only)
        out = out[keep]
        (out * upstream).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run(True)
    ref, ref_grads = run(False)
    assert torch.allclose(out, ref, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-10), name
    moved = model.pair_pass(ids, mask, model.image_blocks(model.project_image(image_tokens)[1], image_mask),
                            queries_only=queries_only, rows=rows.roll(1))
    assert (moved[keep].detach() - out).abs().max() > 1e-4


def test_skipped_positions_change_no_used_output_or_gradient(monkeypatch) -> None:
    """The passes skip work whose result nothing reads: the last layer's positions other than [CLS] (ITC)
    or the queries (ITM), and the feed-forward of padding tokens. Kept outputs and every gradient must
    equal those of the full computation (float64)."""
    from blipkit.plugins.bridges.qformer import model as qformer_model

    model = tiny(dropout=0.0).double()
    tokens = model.tokenize(CAPTIONS[:3])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert not mask.bool().all()
    image_tokens = torch.randn(3, 7, 24, dtype=torch.float64)
    image_mask = model.image_additive_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4]))

    def outputs_and_grads(short: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        _, kv = model.project_image(image_tokens)
        cls = model.text_pass(ids, mask, cls_only=short)[:, :1]
        queries = model.pair_pass(ids, mask, model.image_blocks(kv, image_mask), queries_only=short)[:, : model.num_queries]
        decoded = model.decoder_pass(ids, mask, model.query_pass(kv, image_mask).past)[mask.bool()]
        outputs = [cls, queries, decoded]
        sum((out * torch.randn_like(out)).sum() for out in outputs).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [out.detach() for out in outputs], grads

    short_outputs, short_grads = outputs_and_grads(short=True)
    monkeypatch.setattr(qformer_model, "real_rows", lambda attention_mask: None)
    full_outputs, full_grads = outputs_and_grads(short=False)
    for short, full in zip(short_outputs, full_outputs, strict=True):
        assert torch.allclose(short, full, atol=1e-12)
    assert short_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(short_grads[name], grad, atol=1e-12), name


def test_losses_and_gradients_equal_direct_recomputation(monkeypatch) -> None:
    model = tiny(dropout=0.0).eval()
    image_tokens = torch.randn(4, 7, 24)
    texts = CAPTIONS[:4]
    drawn: list[torch.Tensor] = []
    sample = objectives.sample_hard_negatives
    monkeypatch.setattr(
        objectives, "sample_hard_negatives", lambda *args: drawn.append(sample(*args)) or drawn[-1]
    )
    losses = stage1_loss(model, image_tokens, texts)
    losses["loss"].backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    tokens = model.tokenize(texts)

    sim = model.similarity(model.image_embeds(image_tokens), model.text_embeds(tokens)).double()
    sim = sim / model.temp.double()
    target = 0.9 * torch.eye(4, dtype=torch.float64) + 0.1 / 4
    itc = (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean()) / 2

    neg_image, neg_text = drawn
    pair_images = torch.cat([image_tokens, image_tokens[neg_image], image_tokens])
    pair_texts = {k: torch.cat([v, v, v[neg_text]]) for k, v in tokens.items()}
    logits = model.itm_logits(pair_images, pair_texts).double()
    itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 8))

    ids, mask = _dec_ids(model, texts)
    hidden = _unilm_itg_hidden(model, image_tokens, ids, mask)
    log_probs = model.lm_head(hidden[:, :-1], model.embeddings.word.weight).double().log_softmax(-1)
    labels, valid = ids[:, 1:], mask[:, 1:].bool()
    nll = -log_probs.gather(-1, labels[..., None]).squeeze(-1)
    itg = (0.9 * nll - 0.1 * log_probs.mean(-1))[valid].mean()
    assert abs(losses["itc"].item() - itc.item()) < 1e-5
    assert abs(losses["itm"].item() - itm.item()) < 1e-5
    assert abs(losses["itg"].item() - itg.item()) < 1e-5
    assert abs(losses["loss"].item() - (itc + itm + itg).item()) < 1e-4
    assert losses["itm_acc"].item() == (logits.argmax(1) == torch.tensor([1] * 4 + [0] * 8)).float().mean().item()
    (itc + itm + itg).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(grads[name], param.grad.to(grads[name].dtype), atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("chosen", [("itc", "itg"), ("itm",), ("itg",), ("itc", "itm")])
def test_chosen_objectives_train_alone_and_equal_the_full_losses(chosen: tuple[str, ...]) -> None:
    full = tiny(dropout=0.0).eval()
    part = tiny(dropout=0.0, objectives=list(chosen)).eval()
    part.load_state_dict(full.state_dict())
    image_tokens = torch.randn(4, 7, 24)
    torch.manual_seed(0)
    reference = stage1_loss(full, image_tokens, CAPTIONS[:4])
    torch.manual_seed(0)
    losses = stage1_loss(part, image_tokens, CAPTIONS[:4])
    losses["loss"].backward()

    assert set(losses) == {"loss", *chosen, *(["itm_acc"] if "itm" in chosen else [])}
    for key in chosen:
        assert abs(losses[key].item() - reference[key].item()) < 1e-6, key
    assert abs(losses["loss"].item() - sum(reference[key].item() for key in chosen)) < 1e-5
    heads = {"itc": ("vision_proj.", "text_proj.", "temp"), "itm": ("itm_head.",), "itg": ("lm_head.",)}
    for objective, prefixes in heads.items():
        for name, param in part.named_parameters():
            if name.startswith(prefixes):
                assert (param.grad is not None) == (objective in chosen), name


def test_spelling_loss_equals_a_direct_recomputation_in_float64() -> None:
    model = tiny(dropout=0.0, objectives=["spell"]).eval().double()
    image_tokens = torch.randn(3, 7, 24, dtype=torch.float64)
    texts = ["ab c", "a caption longer than the four queries", ""]
    losses = stage1_loss(model, image_tokens, texts)
    tokens = model.tokenize(texts)
    with torch.no_grad():
        queries = model(image_tokens).queries
        terms = []
        for row in range(len(texts)):
            words = tokens["input_ids"][row][tokens["attention_mask"][row].bool()].tolist()[1:-1]
            for k in range(model.num_queries):
                if words:
                    logits = model.lm_head(queries[row, k], model.embeddings.word.weight)
                    terms.append(-torch.log_softmax(logits, dim=-1)[words[k % len(words)]])
    assert set(losses) == {"loss", "spell"} and model.objectives == ("spell",)
    assert torch.allclose(losses["spell"].detach(), torch.stack(terms).mean(), atol=1e-10)
    losses["loss"].backward()
    assert model.query_tokens.grad.abs().sum() > 0 and model.vision_proj.weight.grad is None


@pytest.mark.parametrize("bad", [[], "itc", ["itc", "mlm"]])
def test_unknown_or_empty_objectives_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="objectives: expected a non-empty list drawn from itc, itm, itg"):
        tiny(objectives=bad)


def test_without_itm_the_objectives_survive_saving_and_itm_scores_are_refused(tmp_path: Path) -> None:
    model = tiny(objectives=["itg", "itc"])
    assert model.objectives == ("itc", "itg") and not model.has_itm and tiny().has_itm
    model.save_pretrained(tmp_path)
    loaded = QFormer.from_pretrained(tmp_path)
    assert loaded.objectives == ("itc", "itg")
    with pytest.raises(BlipkitError, match="trained without image-text matching"):
        loaded.itm_score(torch.randn(2, 7, 24), CAPTIONS[:2])


def test_hard_negatives_are_never_positives() -> None:
    generator_state = torch.get_rng_state()
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positives = objectives.positive_mask(objectives.Split((8,)), image_ids, torch.device("cpu"))
    assert positives.sum().item() == 4 + 1 + 9 + 1 + 1
    for _ in range(200):
        sim = torch.randn(8, 8) * 20
        sim.fill_diagonal_(50.0)  # the positive dominates the softmax
        negatives = objectives.sample_hard_negatives(sim, positives)
        assert not positives[torch.arange(8), negatives].any()
    every = torch.ones(3, 3, dtype=torch.bool)  # all captions of one image: only itself is excluded
    for _ in range(100):
        negatives = objectives.sample_hard_negatives(torch.randn(3, 3), every)
        assert (negatives != torch.arange(3)).all()
    torch.set_rng_state(generator_state)


def test_image_ids_make_same_image_captions_positive_in_itc() -> None:
    model = tiny(dropout=0.0).eval()
    image_tokens = torch.randn(4, 7, 24)
    image_tokens[1] = image_tokens[0]
    texts = CAPTIONS[:4]
    ids = torch.tensor([7, 7, 8, 9])
    with torch.no_grad():
        losses = stage1_loss(model, image_tokens, texts, image_ids=ids)
        sim = model.similarity(model.image_embeds(image_tokens), model.text_embeds(texts)).double()
        sim = sim / model.temp.double()
    pos = (ids[:, None] == ids[None, :]).double()
    target = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / 4
    itc = (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean()) / 2
    assert abs(losses["itc"].item() - itc.item()) < 1e-5


def test_image_mask_in_stage1() -> None:
    model = tiny(dropout=0.0).eval()
    image_tokens = torch.randn(3, 9, 24)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[:, 6:] = 0
    changed = image_tokens.clone()
    changed[:, 6:] = torch.randn(3, 3, 24)
    torch.manual_seed(0)
    a = stage1_loss(model, image_tokens, CAPTIONS[:3], image_mask=mask)
    torch.manual_seed(0)
    b = stage1_loss(model, changed, CAPTIONS[:3], image_mask=mask)
    for key in ("itc", "itm", "itg"):
        assert abs(a[key].item() - b[key].item()) < 1e-5


def test_overfitting_eight_pairs_lowers_every_loss() -> None:
    model = tiny().train()
    images = torch.randn(8, 6, 24)
    tokens = model.tokenize(CAPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    history = []
    for _ in range(30):
        losses = stage1_loss(model, images, tokens)
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[:3], history[-3:]
    for key in ("loss", "itg"):
        assert sum(h[key] for h in last) < 0.7 * sum(h[key] for h in first), key
    for key in ("itc", "itm"):
        assert sum(h[key] for h in last) < sum(h[key] for h in first), key
    assert 0.001 <= model.temp.item() <= 0.5


def test_offsets_of_a_rank_come_from_the_sizes_of_the_ranks_before_it() -> None:
    split = objectives.Split((3, 5), rank=1)
    assert split.total == 8 and split.world == 2 and split.local == slice(3, 8)
    positives = objectives.positive_mask(split, None, torch.device("cpu"))
    assert torch.equal(positives, torch.eye(8, dtype=torch.bool)[3:])
    generator_state = torch.get_rng_state()
    every = torch.ones(5, 8, dtype=torch.bool)  # only the pair itself is excluded: column 3 + row
    for _ in range(50):
        negatives = objectives.sample_hard_negatives(torch.randn(5, 8), every, split.local.start)
        assert (negatives != torch.arange(3, 8)).all()
    torch.set_rng_state(generator_state)


def test_gathers_on_a_world_of_one_are_the_identity(monkeypatch) -> None:
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("a world of one needs no collective")

    for name in ("all_gather", "all_reduce", "all_gather_object"):
        monkeypatch.setattr(dist, name, refuse)
    x = torch.randn(3, 4, requires_grad=True)
    assert objectives.batch_split(3, x.device) == objectives.Split((3,), 0)
    assert objectives.gather_with_grad(x) is x
    assert objectives.gather_with_grad(x, objectives.Split((3,))) is x
    ids = torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 1]])
    assert objectives.gather_padded(ids, 0) is ids
    assert objectives.all_gather_rows(ids, objectives.Split((3,))) is ids


# The global batch of the two-rank runs and each rank's rows of it. Rows 2 and 3 (one on each rank) and rows
# 0 and 7 show the same image, so positives cross ranks; rows 1 and 4 mask some encoder tokens. The runs are
# in float64: ranks pad their captions to their own longest and sum in other orders than one process does,
# which in float32 moves gradients by up to ~1e-3 of their scale; in float64 no real difference hides in that.
LOCAL = (slice(0, 3), slice(3, 8))
IMAGE_IDS = torch.tensor([0, 1, 2, 2, 3, 4, 5, 0])
IMAGE_MASK = (torch.arange(7) < torch.tensor([7, 5, 7, 7, 3, 7, 7, 7])[:, None]).long()


def _global_batch() -> tuple[QFormer, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny(dropout=0.0).eval().double()
    images = torch.randn(8, 7, 24, dtype=torch.float64)
    images[3], images[7] = images[2], images[0]
    return model, images


def _grads(model: QFormer) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _rank_worker(rank: int, directory: str) -> None:
    """Each rank's losses, drawn ITM negatives and gradients (summed over ranks) of two runs: ITC over an
    unequal split of 8 rows, and ITC + ITM over one row per rank."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    # A collective that one rank never reaches fails the test instead of hanging it.
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    drawn: list[torch.Tensor] = []
    sample = objectives.sample_hard_negatives
    objectives.sample_hard_negatives = lambda *args: drawn.append(sample(*args)) or drawn[-1]
    model, images = _global_batch()

    def summed_grads() -> dict[str, torch.Tensor]:
        grads = _grads(model)
        for grad in grads.values():
            dist.all_reduce(grad)
        model.zero_grad(set_to_none=True)
        return grads

    local = LOCAL[rank]
    losses = stage1_loss(model, images[local], CAPTIONS[local], image_mask=IMAGE_MASK[local], image_ids=IMAGE_IDS[local])
    # The trainer weights each rank's loss by n_r * world / n_total and DDP averages over ranks: the same as
    # weighting by n_r / n_total and summing.
    (losses["itc"] * len(CAPTIONS[local]) / len(CAPTIONS)).backward()
    unequal = {"losses": {k: v.detach() for k, v in losses.items()}, "grads": summed_grads(), "drawn": list(drawn)}

    drawn.clear()
    pair_images = images[rank : rank + 1].clone().requires_grad_()
    losses = stage1_loss(model, pair_images, CAPTIONS[rank : rank + 1], image_mask=IMAGE_MASK[rank : rank + 1])
    ((losses["itc"] + losses["itm"]) / 2).backward()
    pairs = {
        "losses": {k: v.detach() for k, v in losses.items()}, "grads": summed_grads(), "drawn": drawn,
        "image_grad": pair_images.grad,
    }
    torch.save({"unequal": unequal, "pairs": pairs}, Path(directory) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What ``_rank_worker`` saved on each of 2 gloo processes."""
    import torch.multiprocessing as mp

    directory = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_worker, args=(str(directory),), nprocs=2, join=True)
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def _assert_same_grads(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    # Measured against the largest gradient: some (attention key biases) are zero up to rounding.
    assert grads.keys() == reference.keys()
    scale = max(grad.abs().max() for grad in reference.values())
    for name, grad in reference.items():
        assert (grads[name] - grad).abs().max() <= 1e-10 * scale, name


@pytest.mark.distributed
@pytest.mark.slow
def test_itc_over_unequal_ranks_equals_one_process_on_the_global_batch(two_ranks: list[dict]) -> None:
    runs = [r["unequal"] for r in two_ranks]
    model, images = _global_batch()
    full = stage1_loss(model, images, CAPTIONS, image_mask=IMAGE_MASK, image_ids=IMAGE_IDS)
    full["itc"].backward()
    for key in ("itc", "itg"):
        # ITG rescales each rank's token mean so that weighting ranks by rows gives the mean over all tokens.
        weighted = sum(run["losses"][key] * len(CAPTIONS[local]) for run, local in zip(runs, LOCAL, strict=True)) / 8
        assert abs(weighted.item() - full[key].item()) < 1e-12, key
    assert {"text_proj.weight", "vision_proj.weight", "query_tokens", "temp"} <= runs[0]["grads"].keys()
    for run in runs:
        _assert_same_grads(run["grads"], _grads(model))
    for run, local in zip(runs, LOCAL, strict=True):
        assert torch.isfinite(run["losses"]["itm"])
        for negatives in run["drawn"]:
            assert negatives.shape == (len(CAPTIONS[local]),)
            assert (IMAGE_IDS[negatives] != IMAGE_IDS[local]).all()


@pytest.mark.distributed
@pytest.mark.slow
def test_itm_negatives_come_from_the_other_rank(two_ranks: list[dict]) -> None:
    """With one row per rank the only negative of each row is the other rank's sample, so ITC and ITM with
    their gradients (through the gathered negative images too) equal one process on the batch of two."""
    runs = [r["pairs"] for r in two_ranks]
    for rank, run in enumerate(runs):
        assert [negatives.tolist() for negatives in run["drawn"]] == [[1 - rank], [1 - rank]]
    model, images = _global_batch()
    pair_images = images[:2].clone().requires_grad_()
    full = stage1_loss(model, pair_images, CAPTIONS[:2], image_mask=IMAGE_MASK[:2])
    (full["itc"] + full["itm"]).backward()
    for key in ("itc", "itm"):
        assert torch.isfinite(full[key])
        assert abs(sum(run["losses"][key] for run in runs).item() / 2 - full[key].item()) < 1e-12, key
    for run in runs:
        _assert_same_grads(run["grads"], _grads(model))
    image_grad = torch.cat([run["image_grad"] for run in runs])
    assert (image_grad - pair_images.grad).abs().max() <= 1e-10 * pair_images.grad.abs().max()
