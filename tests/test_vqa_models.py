"""Attention VQA models (issue 4): the SAN hop formula, top-k pooling limits, AdaHAN's threshold,
the Relation Network's pairs, hard attention's "never seen" guarantee, every model's shapes, a
checkpoint round trip and a small training that must learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import protozoo
from protozoo.attention import (AttentionHop, RelationModule, TopKPool, adaptive_kept,
                                cell_coordinates, resolve_k, select_adaptive, tanh_score_cap)
from protozoo.data.sort_of_clevr import perturbed_dataset
from protozoo.backbones import Geometry, create_backbone
from protozoo.errors import DataError, UserError
from protozoo.models.hard_attention import CellEmbedding, WordReads, time_reasoning
from protozoo.models.vqa import attention_metrics, cell_coverage
from protozoo.models.probes import predictions

VOCAB = ["<pad>", "<unk>", "bottom", "cell", "colour", "left", "of", "right", "top", "what"]
ANSWERS = ["blue", "green", "red"]


def random_batch(b=4, size=75, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, size, size, generator=g)
    question = torch.randint(2, len(VOCAB), (b, length), generator=g)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    question[torch.arange(length) >= lengths[:, None]] = 0
    return image, question, lengths


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: two threads spin against other processes and
    run 10-40x slower than one (measured), so these tests use one and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name, **kwargs):
    torch.manual_seed(0)
    return protozoo.create_model(name, class_names=ANSWERS, vocab=VOCAB, **kwargs)


# ----------------------------------------------------------------------------- SAN hop

def hand_hop(v, u, score_tanh):
    """Yang et al. eqs. 15-17, 19 in plain Python for the weights set in test_hop_formula."""
    w_i, w_q, b_q, w_p, b_p = [[1, 0], [0, 1]], [[0.5, -1], [1, 0]], [0.1, -0.2], [1, -2], 0.3
    q = [sum(w_q[r][c] * u[c] for c in range(2)) + b_q[r] for r in range(2)]
    scores = []
    for cell in v:
        h = [math.tanh(sum(w_i[r][c] * cell[c] for c in range(2)) + q[r]) for r in range(2)]
        s = w_p[0] * h[0] + w_p[1] * h[1] + b_p
        scores.append(math.tanh(s) if score_tanh else s)
    z = sum(math.exp(s) for s in scores)
    p = [math.exp(s) / z for s in scores]
    new_u = [sum(p[i] * v[i][c] for i in range(len(v))) + u[c] for c in range(2)]
    return p, new_u


@pytest.mark.parametrize("score_tanh", [False, True])
def test_hop_formula_matches_hand_computation(score_tanh):
    hop = AttentionHop(2, 2, score_tanh=score_tanh)
    with torch.no_grad():
        hop.image.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        hop.query.weight.copy_(torch.tensor([[0.5, -1.0], [1.0, 0.0]]))
        hop.query.bias.copy_(torch.tensor([0.1, -0.2]))
        hop.score.weight.copy_(torch.tensor([[1.0, -2.0]]))
        hop.score.bias.copy_(torch.tensor([0.3]))
    v, u = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.5, -0.5]
    new_u, p = hop(torch.tensor([v]), torch.tensor([u]))
    p_hand, u_hand = hand_hop(v, u, score_tanh)
    assert torch.allclose(p[0], torch.tensor(p_hand), atol=1e-6)
    assert torch.allclose(new_u[0], torch.tensor(u_hand), atol=1e-6)
    if not score_tanh:  # worked on paper: scores 0.6693, -0.7323, -0.4715
        assert torch.allclose(p[0], torch.tensor([0.6387, 0.1572, 0.2041]), atol=1e-4)
        assert torch.allclose(new_u[0], torch.tensor([1.3428, -0.1387]), atol=1e-4)


def test_tanh_bounded_scores_cap_a_cell_near_3_7_percent():
    n = 196
    assert tanh_score_cap(n) == pytest.approx(math.e ** 2 / (math.e ** 2 + 195), rel=1e-12)
    assert tanh_score_cap(n) == pytest.approx(0.0365, abs=1e-4)
    v = torch.full((1, n, 1), -3.0)
    v[0, 17] = 3.0  # one cell the attention should pick out
    u = torch.zeros(1, 1)
    peaks = {}
    for score_tanh in (False, True):
        hop = AttentionHop(1, 1, score_tanh=score_tanh)
        with torch.no_grad():
            hop.image.weight.fill_(1.0)
            hop.query.weight.zero_(), hop.query.bias.zero_()
            hop.score.weight.fill_(100.0), hop.score.bias.zero_()
        with torch.no_grad():
            _, p = hop(v, u)
        assert int(p.argmax()) == 17
        peaks[score_tanh] = float(p.max())
    assert peaks[False] > 0.999  # the paper's softmax can put all the mass on one cell
    assert peaks[True] == pytest.approx(tanh_score_cap(n), abs=1e-6)


# ----------------------------------------------------------------------------- top-k

def test_resolve_k():
    assert resolve_k(0.25, 25) == 7 and resolve_k(0.25, 196) == 49 and resolve_k(0.1, 30) == 3
    assert resolve_k(1.0, 25) == 25 and resolve_k(0.01, 25) == 1 and resolve_k(40, 25) == 25
    for bad in (0, -1, 0.0, 1.5, True, "3"):
        with pytest.raises(ValueError):
            resolve_k(bad, 25)


def test_topk_pool_limits_are_global_max_and_average_pooling():
    x = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    gmp = F.adaptive_max_pool2d(x, 1).flatten(1)
    gap = x.mean(dim=(2, 3))
    assert torch.equal(TopKPool(1, "channel", "max")(x), gmp)
    assert torch.equal(TopKPool(1, "channel", "mean")(x), gmp)
    for score in ("channel", "norm"):
        assert torch.allclose(TopKPool(24, score, "mean")(x), gap, atol=1e-6)
        assert torch.allclose(TopKPool(1.0, score, "mean")(x), gap, atol=1e-6)
    assert not torch.allclose(TopKPool(2, "channel", "mean")(x), gap, atol=1e-3)


def test_topk_by_norm_by_hand():
    # 1x3 map, 2 channels: cell norms 5, 1, 2 -> k=2 keeps cells 0 and 2
    x = torch.tensor([[[[3.0, 1.0, 0.0]], [[4.0, 0.0, 2.0]]]])
    assert torch.equal(TopKPool(2, "norm", "max")(x), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(TopKPool(2, "norm", "mean")(x), torch.tensor([[1.5, 3.0]]))
    sel = TopKPool(2, "norm", "none")(x)
    assert sel.index.tolist() == [[0, 2]] and sel.kept.tolist() == [[True, False, True]]
    assert torch.equal(sel.cells, torch.tensor([[[3.0, 4.0], [0.0, 2.0]]]))
    # custom scores replace the norm
    assert torch.equal(TopKPool(1, "norm", "max")(x, torch.tensor([[[0.0, 9.0, 1.0]]])),
                       torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="per-channel"):
        TopKPool(2, "channel", "none")


@pytest.mark.parametrize("score", ["norm", "channel"])
def test_gradient_only_reaches_kept_cells(score):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    TopKPool(5, score, "mean")(x).sum().backward()
    flat = x.detach().flatten(2)
    if score == "norm":
        kept = torch.zeros(2, 16, dtype=torch.bool)
        kept.scatter_(1, flat.norm(dim=1).topk(5, dim=1).indices, True)
        kept = kept[:, None].expand(-1, 3, -1)
    else:
        kept = torch.zeros(2, 3, 16, dtype=torch.bool)
        kept.scatter_(2, flat.topk(5, dim=2).indices, True)
    grad = x.grad.flatten(2)
    assert torch.all(grad[~kept] == 0)
    assert torch.allclose(grad[kept], torch.full_like(grad[kept], 1 / 5))


# ----------------------------------------------------------------------------- AdaHAN

def test_adahan_threshold_on_hand_made_scores():
    # softmax rows: [.81 .11 .04 .04], [.37 .37 .13 .13], uniform; threshold 1/N = 0.25
    scores = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    expected = [[True, False, False, False], [True, True, False, False], [True] * 4]
    assert adaptive_kept(scores).tolist() == expected
    random = torch.randn(50, 25, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(adaptive_kept(random), torch.softmax(random, 1) >= 1 / 25)

    cells = torch.arange(12.0).view(3, 4, 1) + 1  # cell value = 1 + flat index + 4 * image
    sel = select_adaptive(cells, scores)
    assert sel.cells.shape == (3, 4, 1)  # packed to the largest count in the batch
    assert sel.counts.tolist() == [1, 2, 4]
    assert sel.valid.tolist() == [[True, False, False, False], [True, True, False, False],
                                  [True] * 4]
    assert sel.cells[0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # padding rows are zeros
    assert sorted(sel.cells[1, :2, 0].tolist()) == [5.0, 6.0]
    assert sel.pool("mean")[:, 0].tolist() == [1.0, 5.5, 10.5]
    assert sel.pool("max")[:, 0].tolist() == [1.0, 6.0, 12.0]


# ----------------------------------------------------------------------------- Relation Network

def relation_by_loops(rn, objects, question):
    """g over every ordered pair by explicit concatenation, summed, then f (Santoro et al.)."""
    first = rn.g_first
    total = 0
    for i in range(objects.shape[0]):
        for j in range(objects.shape[0]):
            pair = torch.cat([objects[i], objects[j], question])
            total = total + rn.g_rest(first(pair))
    return rn.f(total[None])[0]


def test_relation_module_equals_pairwise_loops_and_counts_pairs():
    torch.manual_seed(0)
    rn = RelationModule(object_dim=3, question_dim=2, num_outputs=4, g_dim=8, f_dim=8).eval()
    objects, question = torch.randn(2, 5, 3), torch.randn(2, 2)
    batched = rn(objects, question)
    for b in range(2):
        assert torch.allclose(batched[b], relation_by_loops(rn, objects[b], question[b]),
                              atol=1e-5)
    # invariant to the order of the objects
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(rn(objects[:, perm], question), batched, atol=1e-5)
    # a mask is the same as leaving the masked objects out
    valid = torch.tensor([[True, False, True, True, False], [True] * 5])
    masked = rn(objects, question, valid)
    alone = rn(objects[:1, valid[0]], question[:1])
    assert torch.allclose(masked[0], alone[0], atol=1e-5)
    assert torch.allclose(masked[1], batched[1], atol=1e-5)
    assert RelationModule.pair_counts(valid).tolist() == [9, 25]


def plain_and_variant(**option):
    """The paper's relation module and one with ``option`` on, sharing every common weight, and
    a batch of 2 sets of 5 objects (3 features) with a 2-d question."""
    torch.manual_seed(0)
    plain = RelationModule(object_dim=3, question_dim=2, num_outputs=4, g_dim=8, f_dim=8).eval()
    variant = RelationModule(object_dim=3, question_dim=2, num_outputs=4, g_dim=8, f_dim=8,
                             **option).eval()
    variant.load_state_dict(plain.state_dict(), strict=False)
    return plain, variant, torch.randn(2, 5, 3), torch.randn(2, 2)


@pytest.mark.parametrize("split", [False, True])
def test_relation_module_film_scales_the_pair_term_by_the_question(split):
    """``g(o_i, o_j, q)``'s first layer with ``film``: ``(W_1 o_i + W_2 o_j) * (1 + F q) + W_3 q
    + b``; with ``split_film``, ``(W_1 o_i) * (1 + F_1 q) + (W_2 o_j) * (1 + F_2 q) + W_3 q + b``
    (``F = [F_1; F_2]``); checked against pairwise loops. At initialisation (F = 0) either is the
    paper's module."""
    plain, film, objects, question = plain_and_variant(film=True, split_film=split)
    assert film.film.out_features == 8 * (2 if split else 1)
    assert torch.allclose(film(objects, question), plain(objects, question), atol=1e-6)
    with torch.no_grad():
        film.film.weight.normal_()
        film.film.bias.fill_(0.5)
    w, d = film.g_first.weight, 3
    for b in range(2):
        gain = 1 + film.film(question[b])
        gain_i, gain_j = (gain[:8], gain[8:]) if split else (gain, gain)
        total = torch.zeros(8)
        for i in range(5):
            for j in range(5):
                pre = (w[:, :d] @ objects[b, i] * gain_i + w[:, d:2 * d] @ objects[b, j] * gain_j
                       + w[:, 2 * d:] @ question[b] + film.g_first.bias)
                total = total + film.g_rest(pre)
        assert torch.allclose(film(objects, question)[b], film.f(total[None])[0], atol=1e-4)
    with torch.no_grad():  # a gain of 0 leaves only the question: the objects stop mattering
        film.film.weight.zero_()
        film.film.bias.fill_(-1.0)
    assert torch.allclose(film(objects, question), film(torch.randn(2, 5, 3), question))
    if split:  # the second object's gain alone at 0: g reads o_i only, sum_j g = N g(o_i)
        with torch.no_grad():
            film.film.bias[:8] = 0.0
        pre = objects @ w[:, :d].t() + (question @ w[:, 2 * d:].t() + film.g_first.bias)[:, None]
        total = 5 * film.g_rest(pre).sum(1)
        assert torch.allclose(film(objects, question), film.f(total), atol=1e-4)


def test_split_film_needs_film():
    with pytest.raises(ValueError, match="split_film=True .* needs film=True"):
        RelationModule(object_dim=3, question_dim=2, num_outputs=4, split_film=True)


@pytest.mark.parametrize("pair_pool", ["sum", "sum+max"])
def test_relation_module_extra_is_added_to_the_pooled_pairs(pair_pool):
    """``extra`` ``[B, pooled_dim]`` is added to the pooled relations before ``f``:
    ``f(sum_{i,j} g(o_i, o_j, q) + extra)``, the pairs themselves untouched."""
    torch.manual_seed(0)
    rn = RelationModule(object_dim=3, question_dim=2, num_outputs=4, g_dim=8, f_dim=8,
                        pair_pool=pair_pool).eval()
    assert rn.pooled_dim == (8 if pair_pool == "sum" else 16)
    objects, question = torch.randn(2, 5, 3), torch.randn(2, 2)
    extra = torch.randn(2, rn.pooled_dim)
    out = rn(objects, question, extra=extra)
    for b in range(2):
        g = torch.stack([rn.g_rest(rn.g_first(torch.cat([objects[b, i], objects[b, j],
                                                         question[b]])))
                         for i in range(5) for j in range(5)])
        pooled = g.sum(0) if pair_pool == "sum" else torch.cat([g.sum(0), g.amax(0)])
        assert torch.allclose(out[b], rn.f((pooled + extra[b])[None])[0], atol=1e-4)


def test_word_reads_match_a_hand_computation():
    """``read = sum_l sigmoid(G w_l) sum_i a_li c_i``, ``a_l = softmax_i(<Q w_l, K c_i> / sqrt(d))``
    over the valid cells, for the valid words only; checked with loops."""
    torch.manual_seed(0)
    reads = WordReads(word_dim=4, cell_dim=3, key_dim=5)
    words, cells = torch.randn(2, 3, 4), torch.randn(2, 4, 3)
    word_valid = torch.tensor([[True, True, False], [True, True, True]])
    cell_valid = torch.tensor([[True, False, True, True], [True] * 4])
    read, attention = reads(words, word_valid, cells, cell_valid)
    for b in range(2):
        expected = torch.zeros(3)
        for l in range(3):
            if not word_valid[b, l]:
                assert attention[b, l].abs().max() == 0  # a padding word reads nothing
                continue
            scores = torch.stack([reads.query(words[b, l]) @ reads.key(cells[b, i]) / 5 ** 0.5
                                  for i in range(4)])
            scores[~cell_valid[b]] = float("-inf")
            a = torch.softmax(scores, dim=0)
            assert torch.allclose(attention[b, l], a, atol=1e-6)
            expected += torch.sigmoid(reads.gate(words[b, l])) * (a[:, None] * cells[b]).sum(0)
        assert torch.allclose(read[b], expected, atol=1e-5)
    assert attention[0, :, 1].abs().max() == 0  # a padding cell is never read


def test_word_reads_learn_to_find_the_cell_a_word_names():
    """A toy binding task: six cells, each a colour (one-hot) and a hidden sign; the question is
    a filler word and a colour word; the answer is the named cell's sign, read through the
    words' reads alone. The colour word's weights must land on its cell."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    embed, reads, head = torch.nn.Embedding(7, 16), WordReads(16, 8), torch.nn.Linear(8, 1)
    params = [*embed.parameters(), *reads.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)

    def batch(n):
        colours = torch.stack([torch.randperm(6, generator=g) for _ in range(n)])  # [n, 6]
        sign = torch.randint(0, 2, (n, 6), generator=g).float() * 2 - 1
        cells = torch.cat([F.one_hot(colours, 6).float(), sign[..., None],
                           torch.rand(n, 6, 1, generator=g)], dim=2)
        named = torch.randint(0, 6, (n,), generator=g)
        question = torch.stack([torch.full((n,), 6), named], dim=1)  # [filler, colour]
        target = (sign * (colours == named[:, None]).float()).sum(1)
        return cells, question, target, colours == named[:, None]

    valid = torch.ones(128, 2, dtype=torch.bool)
    for _ in range(300):
        cells, question, target, _ = batch(128)
        read, _ = reads(embed(question), valid, cells)
        loss = F.soft_margin_loss(head(read).squeeze(1), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        cells, question, target, where = batch(128)
        read, attention = reads(embed(question), valid, cells)
        accuracy = (head(read).squeeze(1).sign() == target).float().mean()
        on_named = (attention[:, 1] * where.float()).sum(1).mean()
    assert accuracy > 0.95 and on_named > 0.9, (accuracy, on_named)


def test_han_word_reads_start_as_han_and_map_each_word_over_the_kept_cells():
    """A fresh han with ``word_reads`` answers as han without them (``read_to_f`` starts at 0);
    each real word's weights sum to 1 over the kept cells, 0 elsewhere and for padding; the read's
    own answer is a logged term of the objective."""
    image, question, lengths = random_batch()
    plain = make("han", g_dim=32, f_dim=32, word_reads=False).eval()
    model = make("han", g_dim=32, f_dim=32).eval()  # word reads are the default
    model.load_state_dict(plain.state_dict(), strict=False)
    out = model(*model.inputs({"image": image, "question": question, "question_length": lengths}))
    ref = plain(*plain.inputs({"image": image, "question": question, "question_length": lengths}))
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert out.word_attention.shape == (4, question.shape[1], 5, 5)
    real = (torch.arange(question.shape[1]) < lengths[:, None]).float()
    assert torch.allclose(out.word_attention.sum(dim=(2, 3)), real, atol=1e-5)
    outside = out.word_attention * (~out.kept).unsqueeze(1).float()
    assert outside.abs().max() == 0
    labels = torch.tensor([0, 1, 2, 0])
    terms = model.objective(out, {"label": labels})
    expected = F.cross_entropy(out.read_logits, labels)
    assert torch.isclose(terms["word_reads"], expected)
    glimpse = F.cross_entropy(out.glimpse_logits, labels)  # han's glimpse, weight 1
    answer = F.cross_entropy(out.logits, labels)
    assert torch.isclose(terms["loss"], answer + glimpse + model.read_weight * expected)
    model.read_weight = 0.7
    assert torch.isclose(model.objective(out, {"label": labels})["loss"],
                         answer + glimpse + 0.7 * expected)
    with pytest.raises(ValueError, match="read_weight must be >= 0"):
        make("han", read_weight=-1.0)
    with pytest.raises(ValueError, match="word_reads=True .* needs reasoning='relation'.*"
                                         "pass word_reads=false"):
        make("han", reasoning="pool")


def test_relation_module_distance_is_one_more_input_of_g():
    """``distance=True``: ``g``'s first layer also gets ``|p_i - p_j|`` (p: the objects' last two
    features) times a learnt weight per unit; checked against pairwise loops. With that weight at
    zero it is the module without the distance."""
    plain, rn, objects, question = plain_and_variant(distance=True)
    for b in range(2):
        total = torch.zeros(8)
        for i in range(5):
            for j in range(5):
                gap = math.dist(objects[b, i, 1:].tolist(), objects[b, j, 1:].tolist())
                pre = rn.g_first(torch.cat([objects[b, i], objects[b, j], question[b]]))
                total = total + rn.g_rest(pre + gap * rn.distance)
        assert torch.allclose(rn(objects, question)[b], rn.f(total[None])[0], atol=1e-4)
    with torch.no_grad():
        rn.distance.zero_()
    assert torch.allclose(rn(objects, question), plain(objects, question), atol=1e-6)


def test_relation_module_sum_and_max_over_pairs():
    """``pair_pool="sum+max"``: f reads ``[sum_ij g_ij ; max_ij g_ij]`` (elementwise max),
    checked against pairwise loops; with a mask, the max (like the sum) ignores the padding."""
    torch.manual_seed(0)
    rn = RelationModule(object_dim=3, question_dim=2, num_outputs=4, g_dim=8, f_dim=8,
                        pair_pool="sum+max").eval()
    objects, question = torch.randn(2, 5, 3), torch.randn(2, 2)
    for b in range(2):
        g = torch.stack([rn.g_rest(rn.g_first(torch.cat([objects[b, i], objects[b, j],
                                                          question[b]])))
                         for i in range(5) for j in range(5)])
        pooled = torch.cat([g.sum(0), g.amax(0)])
        assert torch.allclose(rn.relations(objects, question)[b], pooled, atol=1e-5)
        assert torch.allclose(rn(objects, question)[b], rn.f(pooled[None])[0], atol=1e-5)
    valid = torch.tensor([[True, False, True, True, False], [True] * 5])
    alone = rn.relations(objects[:1, valid[0]], question[:1])
    assert torch.allclose(rn.relations(objects, question, valid)[0], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="pair_pool"):
        RelationModule(3, 2, 4, pair_pool="mean")


# ----------------------------------------------------------------------------- backbone

def test_rn_cnn_is_santoros_cnn():
    bb = create_backbone("rn_cnn")
    convs = [m for m in bb.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(24, (3, 3), (2, 2))] * 4
    assert (bb.channels, bb.stride) == (24, 16)
    assert bb.eval()(torch.randn(1, 3, 75, 75)).shape == (1, 24, 5, 5)
    # 4 x (3x3, stride 2, pad 1): RF 1 + 2 * (1 + 2 + 4 + 8) = 31, offset -(1 + 2 + 4 + 8) = -15
    assert bb.geometry == Geometry(stride=16, receptive_field=31, rf_offset=-15)


# ----------------------------------------------------------------------------- models

MODELS = [("san", {}), ("san", {"hops": 3, "score_tanh": True, "coordinates": False}),
          ("han", {}), ("han", {"adaptive": True}),
          ("han", {"reasoning": "pool", "word_reads": False}),
          ("han", {"adaptive": True, "reasoning": "pool", "pool": "max", "word_reads": False}),
          ("han", {"fusion": "sum", "unit_cells": False, "film": False,  # the paper's HAN
                   "split_film": False, "word_reads": False, "cell_features": False,
                   "distance": False}),
          ("han", {"top_k": 0.25, "split_film": False, "word_reads": False}),
          ("han", {"pair_pool": "sum+max"}),
          ("cnn_lstm", {}), ("rn", {}), ("rn", {"film": True, "distance": True}),
          ("rn", {"film": True, "split_film": True})]


@pytest.mark.parametrize("name, kwargs", MODELS)
def test_every_model_runs_forward_backward_with_right_shapes(name, kwargs):
    model = make(name, g_dim=32, f_dim=32, **kwargs) if name in ("han", "rn") else make(
        name, **kwargs)
    image, question, lengths = random_batch()
    out = model(*model.inputs({"image": image, "question": question,
                               "question_length": lengths}))
    hops = kwargs.get("hops", 2) if name == "san" else 1
    assert out.logits.shape == (4, 3) and out.stride == 16
    assert out.attention.shape == (4, hops, 5, 5)
    assert torch.allclose(out.attention.sum(dim=(2, 3)), torch.ones(4, hops), atol=1e-5)
    if name == "han":
        assert out.scores.shape == (4, 5, 5) and out.kept.dtype == torch.bool
        counts = out.kept.flatten(1).sum(1)
        if not kwargs.get("adaptive"):
            expected = math.ceil(kwargs.get("top_k", 0.5) * 25)  # 13 for the default 50%
            assert counts.tolist() == [expected] * 4
        kept_att = out.attention[:, 0][out.kept]
        assert torch.allclose(kept_att, (1 / counts.float()).repeat_interleave(counts))
    else:
        assert out.scores is None and out.kept is None
    pairs = model.reasoning_pairs(out).tolist()
    expected = {"rn": [625] * 4, "san": [0] * 4, "cnn_lstm": [0] * 4}.get(name)
    if name == "han":
        expected = ((out.kept.flatten(1).sum(1) ** 2).tolist()
                    if kwargs.get("reasoning", "relation") == "relation" else [0] * 4)
    assert pairs == expected
    model.objective(out, {"label": torch.tensor([0, 1, 2, 0])})["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_han_presence_is_embedding_norm_and_keeps_the_top_k():
    model = make("han", g_dim=32, f_dim=32).eval()
    seen = {}
    model.embed.register_forward_hook(lambda m, i, o: seen.setdefault("emb", o))
    out = model(*random_batch())
    norms = seen["emb"].norm(dim=1)
    assert torch.allclose(out.scores, norms)
    top = norms.flatten(1).topk(13, dim=1).indices  # 13 = ceil(0.5 * 25), the default
    assert torch.equal(out.kept.flatten(1), torch.zeros(4, 25, dtype=torch.bool).scatter_(
        1, top, True))


def _set_embedding(emb: CellEmbedding, conv, question, bias=None):
    with torch.no_grad():
        emb.conv.weight.copy_(torch.tensor(conv, dtype=torch.float32)[:, :, None, None])
        emb.question.weight.copy_(torch.tensor(question, dtype=torch.float32))
        emb.question.bias.zero_()
        if bias is not None:
            emb.conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_gated_cell_embedding_by_hand():
    """``e = ReLU(W (v - median cell)) * 2 sigmoid(P q)``, one 1x3 image of 2 channels."""
    emb = CellEmbedding(channels=2, question_dim=1, embed_dim=2, fusion="gate")
    _set_embedding(emb, conv=[[1, 0], [1, -1]], question=[[1], [-1]])
    v = torch.tensor([[[[0.0, 1.0, 5.0]], [[2.0, 2.0, 3.0]]]])  # channels x (1 x 3 cells)
    q = torch.tensor([[math.log(3.0)]])  # gates 2 sigmoid(+-log 3) = 1.5, 0.5
    e = emb(v, q)
    # median cell (1, 2); v - m = (-1, 0), (0, 0), (4, 1) -> W: (-1, -1), (0, 0), (4, 3)
    expected = torch.tensor([[[[0.0, 0.0, 6.0]], [[0.0, 0.0, 1.5]]]])
    assert torch.allclose(e, expected)


def test_gated_presence_is_zero_on_the_typical_cell_whatever_the_question():
    """A cell equal to the image's median cell (a uniform background) is never present; the
    question decides which of the other cells is the most present."""
    emb = CellEmbedding(channels=2, question_dim=2, embed_dim=2, fusion="gate")
    _set_embedding(emb, conv=[[1, 0], [0, 1]], question=[[4, 0], [0, 4]])
    v = torch.zeros(2, 2, 3, 3)
    v[:, 0, 0, 0] = 1.0  # an object strong in channel 0
    v[:, 1, 2, 2] = 1.0  # another strong in channel 1
    q = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # first asks about channel 0, second channel 1
    presence = emb(v, q).norm(dim=1).flatten(1)
    background = torch.ones(9, dtype=torch.bool)
    background[[0, 8]] = False
    assert (presence[:, background] == 0).all()
    assert presence.argmax(1).tolist() == [0, 8]
    assert (emb(torch.full((1, 2, 3, 3), 0.7), q[:1]) == 0).all()  # uniform image: nothing


def test_summed_cell_embedding_is_the_papers_form():
    emb = CellEmbedding(channels=2, question_dim=1, embed_dim=2, fusion="sum")
    _set_embedding(emb, conv=[[1, 0], [1, -1]], question=[[1], [2]], bias=[0.5, 0.0])
    v = torch.tensor([[[[0.0, 1.0]], [[2.0, -3.0]]]])
    q = torch.tensor([[1.0]])  # adds (1, 2) to every cell: (1, 4), (2, -1)
    expected = torch.tensor([[[[1.5, 2.5]], [[0.0, 3.0]]]])  # ReLU(x + 0.5), ReLU(x - y)
    assert torch.allclose(emb(v, q), expected)
    with pytest.raises(ValueError, match="fusion must be 'gate' or 'sum'"):
        CellEmbedding(2, 1, 2, fusion="product")


def _replace_unkept(kept, flip: bool):
    """A forward hook giving non-kept cells new features that stay non-kept: for top-k, random
    vectors at half the norm; for AdaHAN (whose threshold depends on every score), the negated
    vector (same norm, so the same scores)."""
    def hook(module, inputs, output):
        unkept = ~kept[:, None].expand_as(output)
        if flip:
            new = -output
        else:
            noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
            new = noise / noise.norm(dim=1, keepdim=True) * output.norm(dim=1, keepdim=True) / 2
        return torch.where(unkept, new, output)
    return hook


@pytest.mark.parametrize("kwargs", [{}, {"adaptive": True},
                                    {"reasoning": "pool", "word_reads": False}])
def test_han_output_ignores_cells_it_did_not_keep(kwargs):
    model = make("han", g_dim=32, f_dim=32, **kwargs).eval()
    inputs = random_batch()
    with torch.no_grad():
        before = model(*inputs)
        handle = model.embed.register_forward_hook(
            _replace_unkept(before.kept, flip=kwargs.get("adaptive", False)))
        after = model(*inputs)
        handle.remove()
        assert torch.equal(after.kept, before.kept)
        assert not torch.equal(after.scores, before.scores) or kwargs.get("adaptive")
        assert torch.equal(after.logits, before.logits)
        # the same change on the *kept* cells does change the answer scores
        handle = model.embed.register_forward_hook(
            _replace_unkept(~before.kept, flip=kwargs.get("adaptive", False)))
        assert not torch.allclose(model(*inputs).logits, before.logits)
        handle.remove()


def test_han_unit_cells_pass_only_directions_on():
    """With ``unit_cells`` the answer ignores the embeddings' norms (scaling every cell keeps the
    norm order, so the selection); without it, the same scaling changes the answer."""
    inputs = random_batch()
    for unit in (True, False):
        model = make("han", g_dim=32, f_dim=32, unit_cells=unit).eval()
        with torch.no_grad():
            before = model(*inputs)
            handle = model.embed.register_forward_hook(lambda m, i, o: o * 3.0)
            after = model(*inputs)
            handle.remove()
        assert torch.equal(after.kept, before.kept)
        assert torch.allclose(after.scores, before.scores * 3.0)
        assert torch.allclose(after.logits, before.logits, atol=1e-5) == unit


def test_han_reasons_over_kept_cells_as_direction_features_and_position():
    """With ``cell_features`` (default) each kept cell reaches the relation module as
    ``[e / |e|; v; x; y]``: its embedding's direction, its backbone features and its centre;
    without, as ``[e / |e|; x; y]``."""
    from protozoo.attention import cell_coordinates

    image, question, lengths = random_batch()
    for with_features in (True, False):
        model = make("han", g_dim=32, f_dim=32, cell_features=with_features,
                     word_reads=with_features).eval()
        seen = {}
        model.embed.register_forward_hook(lambda m, i, o: seen.update(e=o))
        model.backbone.register_forward_hook(lambda m, i, o: seen.update(v=o))
        model.reasoner.register_forward_pre_hook(lambda m, args: seen.update(o=args[0]))
        with torch.no_grad():
            out = model(image, question, lengths)
        e = F.normalize(seen["e"], dim=1).flatten(2).transpose(1, 2)  # [B, 25, D]
        v = seen["v"].flatten(2).transpose(1, 2)
        xy = cell_coordinates(5, 5).expand(4, -1, -1)
        every = torch.cat([e, v, xy] if with_features else [e, xy], dim=2)
        rows = out.scores.flatten(1).topk(13, dim=1).indices
        expected = every.gather(1, rows[..., None].expand(-1, -1, every.shape[-1]))
        assert seen["o"].shape == (4, 13, 64 + 27 * with_features + 2)
        assert torch.allclose(seen["o"], expected, atol=1e-6)


def test_han_glimpse_reads_every_cell_by_softmax_of_presence():
    """The glimpse is ``head([sum_i softmax(|e|)_i [v_i; x_i; y_i]; q])``, computed by hand."""
    from protozoo.attention import cell_coordinates

    image, question, lengths = random_batch()
    model = make("han", g_dim=32, f_dim=32, glimpse=1.0).eval()
    seen = {}
    model.embed.register_forward_hook(lambda m, i, o: seen.update(e=o))
    model.backbone.register_forward_hook(lambda m, i, o: seen.update(v=o))
    with torch.no_grad():
        out = model(image, question, lengths)
        p = torch.softmax(seen["e"].norm(dim=1).flatten(1), dim=1)  # [B, 25]
        cells = torch.cat([seen["v"].flatten(2).transpose(1, 2),
                           cell_coordinates(5, 5).expand(4, -1, -1)], dim=2)
        read = torch.einsum("bn,bnc->bc", p, cells)
        expected = model.glimpse_head(torch.cat([read, model.encode(question, lengths)], 1))
    assert torch.allclose(out.glimpse_logits, expected, atol=1e-5)


def test_han_glimpse_is_a_training_signal_the_answer_never_reads():
    """The glimpse's weights do not move the answer; its loss is added to the objective with
    weight ``glimpse``; and it gives the presence a gradient on every cell, where the answer
    gives one only on the kept cells (test_han_gradient_is_zero_on_cells_not_kept)."""
    inputs, labels = random_batch(), torch.tensor([0, 1, 2, 0])
    model = make("han", g_dim=32, f_dim=32, glimpse=0.5).eval()
    with torch.no_grad():
        before = model(*inputs)
        for param in model.glimpse_head.parameters():
            param.add_(1.0)
        after = model(*inputs)
    assert torch.equal(after.logits, before.logits)
    assert not torch.allclose(after.glimpse_logits, before.glimpse_logits)

    seen = {}

    def keep(module, args, output):
        output.retain_grad()
        seen["emb"] = output

    model.embed.register_forward_hook(keep)
    out = model(*inputs)
    terms = model.objective(out, {"label": labels})
    ce, aux = F.cross_entropy(out.logits, labels), F.cross_entropy(out.glimpse_logits, labels)
    assert torch.allclose(terms["glimpse"], aux)
    reads = model.read_weight * F.cross_entropy(out.read_logits, labels)  # the word reads
    assert torch.allclose(terms["loss"], ce + 0.5 * aux + reads)
    aux.backward()
    grad = seen["emb"].grad.abs().sum(1)  # [B, h, w]
    assert torch.all(grad[~out.kept] > 0)

    plain = make("han", g_dim=32, f_dim=32, glimpse=0.0, word_reads=False)
    out = plain(*inputs)
    assert out.glimpse_logits is None and not hasattr(plain, "glimpse_head")
    assert set(plain.objective(out, {"label": labels})) == {"loss", "cross_entropy"}


def test_object_centre_cells_by_hand():
    from protozoo.models.hard_attention import object_centre_cells

    owner = torch.zeros(2, 10, 10, dtype=torch.uint8)  # a 5x5 grid of 2-px tiles
    owner[0, 0:2, 0:2] = 1  # centre (1, 1): cell (0, 0)
    owner[0, 6:9, 7:10] = 2  # centre (7.5, 8.5): cell (3, 4)
    owner[1, 4:6, 4:6] = 3  # only object 2 in image 1, centre (5, 5): cell (2, 2)
    target = object_centre_cells(owner, (5, 5)).view(2, 5, 5)
    assert target[0].nonzero().tolist() == [[0, 0], [3, 4]]
    assert target[1].nonzero().tolist() == [[2, 2]]


def test_han_objectness_loss_is_cross_entropy_over_centre_cells():
    """``objectness=w`` adds ``w * mean_b -sum_i t_i log softmax(presence)_i`` with ``t`` uniform
    over the cells that hold an object's centre; data without ownership maps is a UserError."""
    image, question, lengths = random_batch(b=2)
    labels = torch.tensor([0, 1])
    owner = torch.zeros(2, 75, 75, dtype=torch.uint8)
    owner[:, 0:10, 0:10] = 1  # centre in cell (0, 0) of the 5x5 grid (15-px tiles)
    owner[0, 31:41, 60:70] = 2  # centre (36, 65): cell (2, 4), image 0 only
    model = make("han", g_dim=32, f_dim=32, glimpse=0.0, objectness=0.5)
    out = model(image, question, lengths)
    terms = model.objective(out, {"label": labels, "owner": owner})
    logp = torch.log_softmax(out.scores.flatten(1), dim=1)
    expected = (-(logp[0, 0] + logp[0, 2 * 5 + 4]) / 2 - logp[1, 0]) / 2
    assert torch.allclose(terms["objectness"], expected)
    reads = model.read_weight * F.cross_entropy(out.read_logits, labels)  # the word reads
    assert torch.allclose(terms["loss"],
                          F.cross_entropy(out.logits, labels) + reads + 0.5 * expected)
    terms["objectness"].backward()  # the presence of every cell learns from it
    assert model.embed.conv.weight.grad.abs().sum() > 0
    with pytest.raises(UserError, match="objectness and describe_steps need the objects' masks"):
        model.objective(out, {"label": labels})


def test_han_objectness_targets_once_per_distinct_image():
    """A batch that names each question's image (``image_id``) gets the centre cells computed
    once per image: the same as per question."""
    from protozoo.models.hard_attention import object_centre_cells

    owner = torch.zeros(2, 75, 75, dtype=torch.uint8)
    owner[0, 0:10, 0:10] = 1
    owner[1, 31:41, 60:70] = 2
    model = make("han", g_dim=32, f_dim=32, glimpse=0.0, objectness=1.0)
    batch = {"owner": owner[[0, 1, 1, 0]], "image_id": torch.tensor([7, 3, 3, 7])}
    assert torch.equal(model.object_centres(batch, (5, 5)),
                       object_centre_cells(batch["owner"], (5, 5)))


def test_object_descriptions_by_hand():
    """Per cell: centre, mean colour, fill of the bounding box and the centre's offset in cells,
    on the cell holding the centre only; two centres in one cell: the larger ownership value."""
    from protozoo.models.description import DESCRIPTION_CHANNELS, object_descriptions

    owner = torch.zeros(1, 75, 75, dtype=torch.uint8)
    image = torch.zeros(1, 3, 75, 75)
    owner[0, 0:10, 0:10] = 1  # a square, centre (5, 5) px = (1/3, 1/3) cells: cell (0, 0)
    image[0, :, 0:10, 0:10] = torch.tensor([0.5, -1.0, 0.25])[:, None, None]
    image[0, 0, 0, 0] = 1.5  # one pixel off the rest: the colour is a mean over the object
    ys, xs = torch.meshgrid(torch.arange(75.0), torch.arange(75.0), indexing="ij")
    disc = (ys + 0.5 - 40.0) ** 2 + (xs + 0.5 - 52.0) ** 2 <= 25.0  # centre (52, 40) px
    owner[0][disc] = 3
    owner[0, 31:33, 45:47] = 2  # centre (46, 32) px: cell (2, 3) too, but 2 < 3
    d = object_descriptions(owner, image, (5, 5)).view(1, 7, 5, 5)[0]
    assert DESCRIPTION_CHANNELS[0] == "centre" and d.shape[0] == len(DESCRIPTION_CHANNELS)
    assert d[0].nonzero().tolist() == [[0, 0], [2, 3]]
    assert torch.allclose(d[:, 0, 0], torch.tensor(
        [1.0, 0.5 + 1.0 / 100, -1.0, 0.25, 1.0, 1 / 3 - 0.5, 1 / 3 - 0.5]), atol=1e-6)
    area = float(disc.sum())
    assert torch.allclose(d[:, 2, 3], torch.tensor(
        [1.0, 0.0, 0.0, 0.0, area / 100, 52 / 15 - 3.5, 40 / 15 - 2.5]), atol=1e-5)
    assert d[:, (d[0] == 0)].abs().sum() == 0  # nothing on the other cells
    assert torch.equal(object_descriptions(owner, None, (5, 5))[:, 1:4], torch.zeros(1, 3, 25))


def test_describe_terms_by_hand():
    """Centre: BCE on every cell; colour, fill and offset only on the centre cells."""
    from protozoo.models.description import describe_terms

    target = torch.zeros(1, 7, 4)
    target[0, :, 1] = torch.tensor([1.0, 0.5, -1.0, 0.0, 1.0, 0.25, -0.25])
    predicted = torch.zeros(1, 7, 2, 2)
    predicted[0, :, 0, 0] = torch.tensor([2.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])  # not a centre
    predicted[0, :, 0, 1] = torch.tensor([0.0, 0.5, -0.5, 1.0, 0.0, 0.0, 0.0])
    terms = describe_terms(predicted, target)
    softplus = torch.nn.functional.softplus
    centre = (softplus(torch.tensor(2.0)) + 3 * math.log(2)) / 4  # -log(1 - s(2)), 3x -log(1/2)
    assert torch.isclose(terms["describe_centre"], centre)
    assert torch.isclose(terms["describe_colour"], torch.tensor((0.25 + 1.0) / 3))
    assert torch.isclose(terms["describe_fill"], torch.tensor(math.log(2)))
    assert torch.isclose(terms["describe_offset"], torch.tensor(0.0625))
    assert torch.isclose(terms["describe"], centre + (1.25 / 3) + math.log(2) + 0.625)
    # cell 0 says "centre" (logit 2 > 0) and cell 1 does not (logit 0): both wrong
    assert terms["describe_centre_accuracy"] == 0.5
    empty = describe_terms(predicted, torch.zeros(1, 7, 4))  # no object: nothing to describe
    assert [float(empty[k]) for k in ("describe_colour", "describe_fill", "describe_offset")] \
        == [0.0, 0.0, 0.0]
    assert torch.isclose(empty["describe"], empty["describe_centre"])


def _describe_trainer(data, run_dir=None, steps=150, log_every=100, amp="off"):
    """An engine running ``han``'s ``describe`` step phase alone (the answer's phases dropped)."""
    from dataclasses import replace

    from protozoo.config import TrainConfig
    from protozoo.engine import DistInfo, Trainer

    if run_dir is not None:
        run_dir.mkdir()
    model = make("han", g_dim=32, f_dim=32, describe_steps=steps)
    cfg = TrainConfig(model="han", dataset="sort-of-clevr", amp=amp, seed=0)
    trainer = Trainer(cfg, model, data, run_dir, DistInfo())
    trainer.phases = [replace(p, log_every=log_every) for p in trainer.phases if p.steps]
    return trainer


def test_han_describe_phase_pretrains_the_cnn_before_the_answer(tiny_sort_of_clevr):
    """``describe_steps=N``: a ``describe`` step phase of the engine first trains the CNN and
    the describe head alone on the object descriptions (and learns them); the answer's phases
    then train everything but the describe head."""
    from protozoo.config import TrainConfig

    model = make("han", g_dim=32, f_dim=32, describe_steps=150)
    groups = model.param_groups()
    assert sorted(groups) == ["backbone", "describe", "head"]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    cfg = TrainConfig(model="han", dataset="sort-of-clevr")
    describe, train = model.phases(cfg)
    assert (describe.name, describe.steps, describe.task, describe.batch_size) \
        == ("describe", 150, "describe", 64) and describe.action is None
    assert sorted(describe.lrs) == ["backbone", "describe"] and describe.schedule == "cosine"
    assert sorted(train.lrs) == ["backbone", "head"] and train.epochs == 45
    assert [p.name for p in make("han", g_dim=32, f_dim=32).phases(cfg)] == ["train"]

    trainer = _describe_trainer(tiny_sort_of_clevr)
    model = trainer.model
    reasoner = [p.detach().clone() for p in model.reasoner.parameters()]
    cnn = model.backbone.body.cnn.stages[0][0].weight.detach().clone()
    records = trainer.fit()
    # logged every 100 steps counted back from the end: the last record averages 100 steps
    assert [(r["phase"], r["step"]) for r in records] == [("describe", 50), ("describe", 150)]
    result = records[-1]
    assert not any(k.startswith("val/") for k in records[0])
    # 6 of 25 cells hold a centre: "none anywhere" scores 0.76
    assert result["train/describe_centre_accuracy"] > 0.9
    assert result["val/describe_centre_accuracy"] > 0.8 and result["val/describe"] < 3
    assert result["train/loss"] == result["train/describe"]
    assert result["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 149 / 150)))
    assert not torch.equal(model.backbone.body.cnn.stages[0][0].weight, cnn)
    assert all(torch.equal(a, b) for a, b in zip(reasoner, model.reasoner.parameters()))


def test_han_describe_phase_resumes_to_the_same_weights(tiny_sort_of_clevr, tmp_path,
                                                         monkeypatch):
    """A describe phase interrupted mid-way resumes from its last checkpoint (every
    ``log_every`` steps) to the weights, optimiser state and log of an uninterrupted run: the
    batches are one seeded sequence it skips into, the learning rate a function of the step."""
    from protozoo.api import model_from_state
    from protozoo.engine import Trainer, read_resume_state
    from protozoo.models.description import DescribeTask

    reference = _describe_trainer(tiny_sort_of_clevr, tmp_path / "ref", steps=7, log_every=3)
    expected = reference.fit()
    assert [r["step"] for r in expected] == [1, 4, 7]

    original, calls = DescribeTask.terms, []

    def interrupted(self, model, batch):
        calls.append(1)
        if len(calls) == 6:  # step 6 of 7: the last checkpoint is at step 4
            raise KeyboardInterrupt
        return original(self, model, batch)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(DescribeTask, "terms", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _describe_trainer(tiny_sort_of_clevr, run, steps=7, log_every=3).fit()
    state = read_resume_state(run)
    assert state["position"] == {"phase": 0, "epoch": 0, "step": 4, "global_epoch": 0}

    model = model_from_state(state, str(run))  # what train.py --resume does
    resumed = Trainer(reference.cfg, model, tiny_sort_of_clevr, run, reference.dist)
    resumed.phases = reference.phases
    records = resumed.fit(resume=state)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in expected]
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == strip
    mine, theirs = model.state_dict(), reference.model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    final = read_resume_state(run)
    assert final["position"]["finished"]


def test_han_describe_phase_runs_under_autocast(tiny_sort_of_clevr):
    """``--amp bf16`` on a CPU: the describe phase's forward runs in bfloat16 (the engine's
    autocast) and its loss, gradients and validation stay finite."""
    trainer = _describe_trainer(tiny_sort_of_clevr, steps=3, amp="bf16")
    dtypes = []
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:  # the CNN's and the describe head's
        conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = trainer.model.describe_head[0].weight.detach().clone()
    (record,) = trainer.fit()
    assert set(dtypes) == {torch.bfloat16}
    assert all(math.isfinite(v) for k, v in record.items() if "/" in k)
    assert record["step"] == 3 and "val/describe" in record
    assert not torch.equal(trainer.model.describe_head[0].weight, before)


def test_default_schedule_for_builtin_and_other_data():
    from protozoo.config import TrainConfig

    for name, epochs in (("san", 15), ("han", 45), ("rn", 1), ("cnn_lstm", 20)):
        model = make(name, g_dim=32, f_dim=32) if name in ("han", "rn") else make(name)
        (phase,) = model.phases(TrainConfig(model=name, dataset="sort-of-clevr"))
        assert (phase.epochs, phase.schedule) == (epochs, "cosine")
        assert set(phase.lrs) == set(model.param_groups())
        assert phase.lrs == {"backbone": pytest.approx(1e-4), "head": 1e-3}
        for scenes, at_scale in ((9799, epochs), (9800, 20), (20000, 20)):  # the paper's 9,800
            (phase,) = model.phases(TrainConfig(model=name, dataset="sort-of-clevr",
                                                num_train=scenes))
            assert (phase.epochs, phase.schedule) == (at_scale, "cosine")
        (phase,) = model.phases(TrainConfig(model=name, dataset="sort-of-clevr",
                                            num_train=9800, epochs=3))
        assert phase.epochs == 3  # --epochs still wins
        (phase,) = model.phases(TrainConfig(model=name, dataset="clevr", epochs=4, lr=0.01))
        assert (phase.epochs, phase.schedule) == (4, "constant")
        assert phase.lrs == {"backbone": pytest.approx(1e-3), "head": 0.01}
        (phase,) = model.phases(TrainConfig(model=name, dataset="clevr"))
        assert phase.lrs["head"] == 2.5e-4  # Santoro et al.'s RN learning rate


def test_rn_cnn_rgb_starts_from_the_cells_mean_colour():
    """A fresh rn_cnn_rgb outputs each 15 px tile's mean colour and zeros for the CNN branch
    (zero-initialised 1x1 conv), and the branch still gets a gradient."""
    backbone = create_backbone("rn_cnn_rgb")
    image = torch.randn(2, 3, 75, 75)
    out = backbone(image)
    assert out.shape == (2, 27, 5, 5) and backbone.stride == 16
    tile = image[:, :, 15:30, 30:45].mean(dim=(2, 3))  # cell (1, 2)
    torch.testing.assert_close(out[:, :3, 1, 2], tile)
    assert out[:, 3:].abs().max() == 0
    out[:, 3:].sum().backward()
    assert backbone.body.project.weight.grad.abs().sum() > 0


def test_han_gradient_is_zero_on_cells_not_kept():
    model = make("han", g_dim=32, f_dim=32).eval()
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen["emb"] = output

    model.embed.register_forward_hook(keep)
    out = model(*random_batch())
    out.logits.sum().backward()
    grad = seen["emb"].grad.abs().sum(1)  # [B, h, w]
    assert torch.all(grad[~out.kept] == 0)
    assert torch.all(grad[out.kept] > 0)


def test_checkpoint_round_trip_keeps_logits_and_vocab(tmp_path):
    inputs = random_batch()
    for name in ("han", "san"):
        model = make(name, adaptive=True) if name == "han" else make(name)
        model.eval()
        protozoo.save(model, tmp_path / name)
        loaded = protozoo.load(tmp_path / name)
        assert loaded.vocab == VOCAB and loaded.init_kwargs["vocab"] == VOCAB
        assert type(loaded) is type(model) and getattr(loaded, "adaptive", True)
        with torch.no_grad():
            assert torch.equal(loaded(*inputs).logits, model(*inputs).logits)
        ids, lengths = loaded.encode_question(["What colour of cell top left?", "what cell"],
                                              unknown="unk")
        assert lengths.tolist() == [7, 2] and ids[0, 6].item() == 1  # "?" is unknown here
        assert ids[1].tolist()[:2] == [VOCAB.index("what"), VOCAB.index("cell")]


def test_evaluating_a_vqa_run_with_images_is_a_user_error(tmp_path):
    """A VQA report cannot explain a bare image file (no question): say so before any work,
    instead of ignoring --images."""
    from protozoo.evaluation import evaluate_run

    protozoo.save(make("san"), tmp_path / "san")
    before = sorted(p.name for p in (tmp_path / "san").iterdir())
    with pytest.raises(UserError, match="an image alone has nothing to explain; drop --images"):
        evaluate_run(tmp_path / "san", images=["photo.png"])
    assert sorted(p.name for p in (tmp_path / "san").iterdir()) == before


def test_bad_inputs_are_one_line_user_errors():
    with pytest.raises(UserError, match="needs vocab"):
        protozoo.create_model("san", class_names=ANSWERS)
    with pytest.raises(DataError):
        protozoo.create_model("san", class_names=ANSWERS, vocab=["a", "b"])
    model = make("san")
    image, question, lengths = random_batch()
    cases = [((image, question + 100, lengths), "outside this model's vocabulary"),
             ((image, question, torch.zeros_like(lengths)), "question lengths must lie in"),
             ((image, question[0], lengths), "token ids [B, L]"),
             ((image[:3], question, lengths), "3 images for 4 questions"),
             ((image[:, :1], question, lengths), "expected 3-channel images, got 1"),
             ((image[:2], question, lengths, torch.tensor([0, 1, 2, 1])),
              "image_index 2 names no image: there are 2"),
             ((image[:2], question, lengths, torch.tensor([0.0, 1.0, 0.0, 1.0])),
              "image_index must be 4 integers"),
             ((image[0], question[:1], lengths[:1]), "add a batch dimension"),
             ((image[:1], "what cell", 2), "got str; encode text with ids, lengths = "
                                          "model.encode_question(texts)")]
    for args, text in cases:
        with pytest.raises(UserError) as info:
            model(*args)
        assert text in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="unknown word 'purple'"):
        model.encode_question(["what colour purple"])
    # one question as a bare string is one question, not one per character
    ids, lengths = model.encode_question("what cell")
    assert ids.tolist() == [[VOCAB.index("what"), VOCAB.index("cell")]] and lengths.tolist() == [2]
    with pytest.raises(UserError, match="'han' or 'rn'"):
        time_reasoning(model, image, question, lengths)


def test_time_reasoning_times_the_relation_module():
    inputs = random_batch(b=2)
    for name in ("han", "rn"):
        model = make(name, g_dim=32, f_dim=32)
        assert time_reasoning(model, *inputs, repeats=2) > 0
        assert model.training  # restored


# ----------------------------------------------------------------------------- metrics

def test_cell_coverage_by_area():
    """Cells are the 15 px tiles of a 75 px image on a 5x5 grid: the tiles the cell colour,
    the cells' (x, y) and the report's overlay use."""
    masks = torch.zeros(1, 1, 75, 75)
    masks[0, 0, :15, :15] = 1  # exactly cell (0, 0)
    masks[0, 0, 15:20, 30:45] = 1  # a third of cell (1, 2)
    masks[0, 0, 74, 74] = 1  # one pixel of the last cell
    cov = cell_coverage(masks, (5, 5))
    expected = torch.zeros(5, 5)
    expected[0, 0], expected[1, 2], expected[4, 4] = 1.0, 1 / 3, 1 / 225
    assert torch.allclose(cov[0], expected)
    assert torch.equal(cell_coverage(torch.ones(1, 1, 75, 75), (5, 5)), torch.ones(1, 5, 5))
    # the centre of every covered cell is where cell_coordinates puts it
    xy = cell_coordinates(5, 5)
    assert xy[1 * 5 + 2].tolist() == pytest.approx([(37.5 / 75) * 2 - 1, (22.5 / 75) * 2 - 1])


def test_attention_metrics_by_hand():
    coverage = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]],
                             [[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])
    attention = torch.tensor([[[0.7, 0.1], [0.1, 0.1]], [[0.7, 0.1], [0.1, 0.1]],
                              [[0.25, 0.25], [0.25, 0.25]], [[0.5, 0.5], [0.0, 0.0]]])
    scores = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]] * 3 + [[[2.0, 3.0], [9.0, 0.0]]])
    m = attention_metrics(attention, coverage)
    assert torch.allclose(m["attention_mass_on_objects"], torch.tensor([0.75, 0.1, 0.25, 0.5]))
    assert torch.allclose(m["attention_mass_on_objects_chance"],
                          torch.tensor([0.375, 0.25, 0.25, 0.25]))
    # image 3: uniform map, 1 of 4 tied cells covered; image 4: a tie of 2, one covered
    assert torch.allclose(m["pointing_game"], torch.tensor([1.0, 0.0, 0.25, 0.5]))
    # the chance level is the covered share of the cells: 2 of 4 in image 1, 1 of 4 elsewhere
    assert torch.allclose(m["pointing_game_chance"], torch.tensor([0.5, 0.25, 0.25, 0.25]))
    # the presence scores break hard attention's ties (cell 9.0 is not in the tie)
    assert m["pointing_game"][3] == 0.5
    assert attention_metrics(attention, coverage, scores)["pointing_game"][3] == 1.0


def test_explanation_metrics_per_question_type_and_mask():
    model = make("han", g_dim=32, f_dim=32).eval()
    image, question, lengths = random_batch()
    with torch.no_grad():
        out = model(image, question, lengths)
    preds = out.logits.argmax(1)
    labels = torch.stack([preds[0], (preds[1] + 1) % 3, preds[2], (preds[3] + 1) % 3])
    batch = {"label": labels, "question_type": torch.tensor([0, 0, 1, 0]),
             "question_kind": ["shape", "left", "count", "shape"],
             "mask": torch.ones(4, 1, 75, 75)}
    m = model.explanation_metrics(out, batch)
    assert m["accuracy_non_relational"].tolist() == [1.0, 0.0, 0.0]
    assert m["accuracy_relational"].tolist() == [1.0]
    assert m["accuracy_kind_shape"].tolist() == [1.0, 0.0]  # questions 0 and 3
    assert m["accuracy_kind_left"].tolist() == [0.0]
    assert m["accuracy_kind_count"].tolist() == [1.0]
    batch["question_kind"] = ["", "", "", "count"]  # a question without a kind is in none
    assert [k for k in model.explanation_metrics(out, batch) if "kind" in k] == \
        ["accuracy_kind_count"]
    # every cell is covered, so the mass on objects is the attention's whole mass: 1
    assert m["attention_mass_on_objects"].tolist() == pytest.approx([1.0] * 4)
    assert m["attention_mass_on_objects_chance"].tolist() == pytest.approx([1.0] * 4)
    assert m["pointing_game_chance"].tolist() == [1.0] * 4
    assert m["cells_kept_fraction"].tolist() == pytest.approx([13 / 25] * 4)
    assert m["reasoning_pairs"].tolist() == [169.0] * 4  # 13^2
    no_mask = model.explanation_metrics(out, {"label": labels,
                                              "question_type": torch.tensor([-1] * 4)})
    assert set(no_mask) == {"cells_kept_fraction", "reasoning_pairs"}


# ----------------------------------------------------------------------------- a small training

COLOURS = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0]])  # b, g, r


def colour_cells(n, seed):
    """32 px images of 2x2 cells (16 px each, rn_cnn's stride), each a random colour plus noise;
    the question asks for the top-left or the bottom-right cell: answering needs the question
    *and* the right cell."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 3, (n, 2, 2), generator=g)
    image = COLOURS[colours].permute(0, 3, 1, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)
    image = image + 0.3 * torch.randn(image.shape, generator=g)
    which = torch.randint(0, 2, (n,), generator=g)
    ids = {w: i for i, w in enumerate(VOCAB)}
    top = torch.tensor([ids[w] for w in "what colour of cell top left".split()])
    bottom = torch.tensor([ids[w] for w in "what colour of cell bottom right".split()])
    question = torch.where(which[:, None] == 0, top, bottom)
    label = torch.where(which == 0, colours[:, 0, 0], colours[:, 1, 1])
    return image, question, torch.full((n,), 6), label, which


def test_san_learns_to_answer_from_the_asked_cell():
    torch.manual_seed(0)
    model = make("san")
    image, question, lengths, label, _ = colour_cells(1024, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(100):
        i = torch.randint(0, 1024, (32,))
        loss = F.cross_entropy(model(image[i], question[i], lengths[i]).logits, label[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image, question, lengths, label, which = colour_cells(256, seed=1)
    model.eval()
    with torch.no_grad():
        out = model(image, question, lengths)
    assert (out.logits.argmax(1) == label).float().mean() >= 0.95
    # the last hop looks at the cell the question names more than the chance 1/4
    attention = out.attention[:, -1].flatten(1)
    asked = attention[torch.arange(256), torch.where(which == 0, 0, 3)]
    assert asked.mean() > 0.35


# ----------------------------------------------------------------------------- shared passes

@pytest.mark.parametrize("name", ["san", "han", "cnn_lstm", "rn"])
def test_a_shared_image_pass_gives_the_same_answers(name):
    """Questions about one image share its CNN pass (``image_id`` -> ``image_index``) and repeated
    questions share one LSTM pass; the logits equal those of one pass per question."""
    model = make(name, **({} if name in ("san", "cnn_lstm") else {"g_dim": 32, "f_dim": 32}))
    model.eval()
    images, question, lengths = random_batch(b=3)
    image_id = torch.tensor([2, 0, 2, 1, 0, 2])  # six questions about three images
    question = torch.cat([question, question[[1, 1, 0]]])  # repeated questions, too
    lengths = torch.cat([lengths, lengths[[1, 1, 0]]])
    batch = {"image": images[image_id], "image_id": image_id, "question": question,
             "question_length": lengths}
    shared = model.inputs(batch)
    assert len(shared[0]) == 3 and torch.equal(shared[0][shared[3]], images[image_id])
    with torch.no_grad():
        one_by_one = torch.cat([model(images[image_id[i:i + 1]], question[i:i + 1],
                                      lengths[i:i + 1]).logits for i in range(6)])
        together = model(*shared).logits
    torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_a_shared_pass_trains_every_image():
    """Gradients reach the CNN through every question of a shared image."""
    model = make("san")
    images, question, lengths = random_batch(b=2)
    out = model(images, question[:2].repeat(2, 1), lengths[:2].repeat(2),
                torch.tensor([0, 1, 1, 0]))
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_reasoning_step_over_all_cells_costs_more():
    """``time_reasoning(all_cells=True)`` runs the same module on every cell: for han at 25% of
    25 cells (7 kept, 49 pairs vs 625) it must be slower than on the kept cells."""
    model = make("han", g_dim=64, f_dim=32, top_k=0.25)
    inputs = random_batch(b=8)
    with torch.no_grad():
        cells = model.cells(*inputs)
        every = cells.without_selection()
    assert cells.selection.cells.shape[1] == 7 and every.selection.cells.shape[1] == 25
    assert bool(every.selection.kept.all())
    kept = time_reasoning(model, *inputs, repeats=3)
    full = time_reasoning(model, *inputs, repeats=3, all_cells=True)
    assert full > 2 * kept


# ----------------------------------------------------------------------------- dataset metrics

@pytest.fixture(scope="module")
def tiny_sort_of_clevr(tmp_path_factory):
    from protozoo.data import build_data

    return build_data("sort-of-clevr", cache_dir=tmp_path_factory.mktemp("soc"), num_train=8,
                      num_test=4)


def test_consistency_of_a_model_blind_to_the_image_is_one(tiny_sort_of_clevr):
    """The behavioural test compares answers before and after answer-preserving perturbations;
    a model whose CNN outputs zeros answers from the question alone, so nothing can change."""
    data = tiny_sort_of_clevr
    model = protozoo.create_model("cnn_lstm", backbone="rn_cnn", class_names=data.class_names,
                                  **data.model_kwargs)
    last_bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():
        last_bn.weight.zero_()
        last_bn.bias.zero_()
    model.eval()
    metrics = model.dataset_metrics(data)
    assert metrics["consistency"] == 1.0 and metrics["perturbed_questions"] >= 40
    # answers unchanged and every perturbation keeps the answer: the perturbed accuracy is the
    # model's accuracy on the questions that were perturbed
    perturbed = perturbed_dataset(data.test, seed=0, per_question=1,
                                  limit=model.consistency_questions)
    before = predictions(model, Subset(data.test, perturbed.source_indices.tolist()), 64,
                         torch.device("cpu"))
    expected = float((before == np.asarray(perturbed.labels)).mean())
    assert metrics["perturbed_accuracy"] == pytest.approx(expected)


def test_han_reports_its_reasoning_step_against_all_cells(tiny_sort_of_clevr):
    data = tiny_sort_of_clevr
    torch.manual_seed(0)
    model = protozoo.create_model("han", class_names=data.class_names, g_dim=64, f_dim=32,
                                  **data.model_kwargs)
    metrics = model.dataset_metrics(data)
    assert {"consistency", "reasoning_step_ms", "reasoning_step_all_cells_ms"} <= set(metrics)
    assert 0 < metrics["reasoning_step_ms"] < metrics["reasoning_step_all_cells_ms"]
    assert metrics["reasoning_speedup"] == pytest.approx(
        metrics["reasoning_step_all_cells_ms"] / metrics["reasoning_step_ms"], rel=1e-3)


def test_no_behavioural_test_without_scenes():
    from protozoo.models.probes import can_perturb

    class NoScenes:
        def __len__(self):
            return 3

        def scene(self, i):
            return None

        def program(self, i):
            return [{"function": "scene"}]

    class ClevrScenes(NoScenes):  # real CLEVR scenes: 3D objects, no Sort-of-CLEVR description
        def scene(self, i):
            return {"objects": [{"3d_coords": [0, 0, 0]}]}

    assert not can_perturb(NoScenes()) and not can_perturb(ClevrScenes())
    assert not can_perturb([])


def test_vqa_families_train_on_batches_of_whole_scenes():
    """train.py's batch size defaults to the family's: 320 questions (~16 scenes) for VQA, the
    paper's 64 for the full Relation Network."""
    from protozoo.registry import model_batch_size

    assert [model_batch_size(n) for n in ("san", "han", "cnn_lstm")] == [320] * 3
    assert model_batch_size("rn") == 64
    assert model_batch_size("protopnet") == model_batch_size("cam") == 64


def test_evaluating_with_answers_in_another_order_is_a_user_error(tiny_sort_of_clevr, tmp_path):
    """Same number of answers is not enough: a checkpoint whose answer list differs from the
    data's would be scored against the wrong labels, so evaluation stops and names the first."""
    from protozoo.evaluation import evaluate_run

    data = tiny_sort_of_clevr
    names = list(reversed(data.class_names))
    model = protozoo.create_model("cnn_lstm", class_names=names, **data.model_kwargs)
    with pytest.raises(UserError) as info:
        evaluate_run(tmp_path / "run", model=model, data=data,
                     overrides={"dataset": "sort-of-clevr"})
    message = str(info.value)
    assert f"class 0 is '{names[0]}' in the model but '{data.class_names[0]}'" in message
    assert "\n" not in message and not (tmp_path / "run" / "metrics.json").exists()


def test_vqa_report_shows_each_attention_metric_beside_its_chance_level(tiny_sort_of_clevr,
                                                                        tmp_path):
    """Every explanation figure is written beside its chance level: metrics.json holds the
    uniform map's score for both attention metrics (by hand: the mean coverage and the share of
    covered cells of each test question's answer mask), and the report's "chance level" column
    shows them."""
    import json
    import re

    from protozoo.evaluation import evaluate_run
    from protozoo.models.vqa import cell_coverage

    data = tiny_sort_of_clevr
    model = protozoo.create_model("han", g_dim=32, f_dim=32, class_names=data.class_names,
                                  **data.model_kwargs).eval()
    metrics = evaluate_run(tmp_path / "run", model=model, data=data, device="cpu",
                           overrides={"dataset": "sort-of-clevr"})
    cov = torch.cat([cell_coverage(data.test[i]["mask"][None], (5, 5))
                     for i in range(len(data.test))])
    assert metrics["attention_mass_on_objects_chance"] == pytest.approx(float(cov.mean()))
    assert metrics["pointing_game_chance"] == pytest.approx(float((cov > 0).float().mean()))
    assert 0 < metrics["pointing_game_chance"] < 0.5
    html = (tmp_path / "run" / "report" / "index.html").read_text()
    for name in ("attention_mass_on_objects", "pointing_game"):
        row = re.search(rf"<tr><td>{name}</td><td>([^<]*)</td><td>([^<]*)</td></tr>", html)
        assert row and row.group(2) == f"{metrics[name + '_chance']:.4f}", name
    assert "<td>pointing_game_chance</td>" not in html  # shown beside, not on its own row
    json.loads((tmp_path / "run" / "metrics.json").read_text())  # and written
