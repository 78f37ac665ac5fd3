"""kiln.worker.forward on a tiny random Llama: cache allocation, the flat-batch forward against
whole-window forwards, and the draft-model proposer built on both (block pool, greedy drafts)."""

from __future__ import annotations

import pytest
import torch

from kiln.eval.forward import window_logits
from kiln.kernels.kv_quant import QuantizedKV
from kiln.loader.model_loader import LoadedModel, load_model
from kiln.spec_decode.draft_model import DraftModelProposer
from kiln.worker.forward import allocate_model_kv_caches, forward_batch, model_kv_dtype

from loader.tiny_model import build_tiny_models, one_torch_thread

BS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models").hf["tied"], dtype="float32")


def test_caches_follow_the_requested_dtype(tiny: LoadedModel) -> None:
    model, cfg = tiny.model, tiny.model.config
    same = allocate_model_kv_caches(model, 3, BS, model_kv_dtype(model))
    assert len(same) == cfg.num_hidden_layers
    assert same[0][0].shape == (3, BS, cfg.num_key_value_heads, cfg.head_dim) and same[0][0].dtype == torch.float32
    assert allocate_model_kv_caches(model, 3, BS)[0][1].dtype == torch.float16  # auto under fp32 on the CPU
    assert isinstance(allocate_model_kv_caches(model, 3, BS, "int8")[0][0], QuantizedKV)
    with pytest.raises(ValueError, match="bfloat16"):
        allocate_model_kv_caches(model, 3, BS, "nonsense")


@torch.inference_mode()
def test_a_flat_batch_equals_each_sequence_alone(tiny: LoadedModel) -> None:
    """A decode row and a prefill chunk in one batch, each with a cached prefix, give the rows of
    one whole-window forward per sequence."""
    model = tiny.model
    a, b = [5, 9, 14, 3, 7, 22, 8], [11, 4, 30, 2, 6, 19, 27, 13, 1]
    caches = allocate_model_kv_caches(model, 8, BS, model_kv_dtype(model))
    tables = [[0, 1], [2, 3, 4]]
    forward_batch(model, caches, [a[:6], b[:5]], [0, 0], tables, BS)  # prefixes, in one batch
    hidden = forward_batch(model, caches, [a[6:], b[5:]], [6, 5], tables, BS)  # decode first, then a chunk
    logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits[0], window_logits(model, a)[6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:], window_logits(model, b)[5:], rtol=1e-4, atol=1e-4)
    last = forward_batch(model, caches, [a[6:], b[5:]], [6, 5], tables, BS, last_only=True)
    torch.testing.assert_close(last, hidden[[0, 4]])


def greedy(model: torch.nn.Module, tokens: list[int], k: int) -> list[int]:
    out = list(tokens)
    for _ in range(k):
        out.append(int(window_logits(model, out)[-1].argmax()))
    return out[len(tokens):]


def test_draft_proposer_drafts_greedily_and_keeps_the_block_pool_invariants(tiny: LoadedModel) -> None:
    model = tiny.model
    draft = DraftModelProposer(model, num_blocks=6, block_size=BS)
    pool = draft.block_pool
    a, b = [5, 9, 14, 3, 7], [11, 4, 30, 2, 6, 19, 27, 13, 1]
    out = draft.propose({"a": (a, 3), "b": (b, 2)})
    assert out == {"a": greedy(model, a, 3), "b": greedy(model, b, 2)}
    held = [blk for seq in draft.seqs.values() for blk in seq.blocks]
    assert len(held) == 2 + 3 and all(blk.ref_cnt == 1 for blk in held)  # 7 and 10 tokens of KV
    assert pool.get_num_free_blocks() == 6 - len(held)
    # the next step: a accepted one draft and got one more token; c does not fit what is left
    a2 = a + out["a"][:1] + [17]
    out = draft.propose({"a": (a2, 2), "c": (list(range(1, 12)), 1)})
    assert out == {"a": greedy(model, a2, 2)}  # c is left out: no draft memory, no drafts
    draft.free("b")
    draft.free("never-seen")
    assert pool.get_num_free_blocks() == 6 - len(draft.seqs["a"].blocks) - len(draft.seqs["c"].blocks)
    for rid in list(draft.seqs):
        draft.free(rid)
    assert pool.get_num_free_blocks() == pool.num_blocks and not draft.seqs
