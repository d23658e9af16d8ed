import _thread
import copy
import dataclasses
import json
import lzma
import math
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, launch, tiny_env, tiny_gpt_args
import train_gpt as tg

sys.path.insert(0, str(ROOT / "bench"))
import comm_bytes
import exposed_comm
import trace_collectives


# -----------------------------------------------------------------------------
# ownership: every Muon matrix and every element of the Adam parameters has exactly one owner, and the ranks' work
# is balanced

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_muon_ownership_covers_every_matrix_once_and_balances_flops(world_size):
    # groups of 3, 1, 5 and 7 matrices of three shapes (one with a learning-rate multiplier): none divides evenly
    shapes = [(3, 32, 16), (16, 48), (5, 24, 24), (7, 24, 24)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    per_rank = [tg.Muon(params, lr=0.1, momentum=0.9, ns_steps=5, rank=r, world_size=world_size,
                        lr_mults={id(params[3]): 2.0}) for r in range(world_size)]
    flops = [0] * world_size
    for p in params:
        m, n = p.shape[-2:]
        owned = torch.zeros(p.numel(), dtype=torch.int64)
        for r, opt in enumerate(per_rank):
            assert opt.ranges[id(p)] == per_rank[0].ranges[id(p)], "every rank computes the same table"
            s, e = opt.owned(p)
            assert s % (m * n) == 0 and e % (m * n) == 0, "whole matrices"
            owned[s:e] += 1
            flops[r] += (e - s) // (m * n) * m * n * min(m, n)
        assert owned.eq(1).all(), "each element owned by exactly one rank"
    # shares of a group differ by at most one matrix, so the ranks' FLOPs differ by at most one of each group's
    assert max(flops) - min(flops) <= 32 * 16 * 16 + 24 * 24 * 24 + 16 * 48 * 16
    groups = per_rank[0].param_groups
    assert sorted(g["lr"] for g in groups) == [0.1, 0.1, 0.1, 0.2]


def sharded_model(kind: str, vocab_size: int):
    # a small model on meta: dense, or with 32 experts (top-4) or 8 (top-1) and a shared one in its second layer
    experts = dict(dense=dict(num_experts=0), e32=dict(num_experts=32, top_k=4), e8=dict(num_experts=8, top_k=1))
    args = dataclasses.replace(tiny_gpt_args(), vocab_size=vocab_size, shared_experts=1, moe_layers="1",
                               num_layers=3, grad_reduce="reduce_scatter", **experts[kind])
    with torch.device("meta"):
        model = tg.GPT(args)
    return model, args


@pytest.mark.parametrize("kind", ["dense", "e32", "e8"])
@pytest.mark.parametrize("vocab_size", [50257, 64])  # Adam's mass 20x Muon's, and a 20th of it
def test_shard_owners_give_each_element_one_owner_and_level_the_ranks(kind, vocab_size):
    model, args = sharded_model(kind, vocab_size)
    for n in range(2, 9):
        adam, muon = tg.build_optimizers(model, args, 0, n, torch.device("meta"))
        ranges = adam.ranges | muon.ranges
        params = list(model.parameters())
        assert {id(p) for p in params} == set(ranges)
        length, has_adam, flops = [0] * n, [False] * n, [0] * n
        for p in params:
            # plain reference: count each element's owners one element at a time
            owners = torch.zeros(p.numel(), dtype=torch.int64)
            for r, (s, e) in enumerate(ranges[id(p)]):
                owners[s:e] += 1
                length[r] += e - s
                if id(p) in muon.ranges:
                    m, k = next(g["matrix"] for g in muon.param_groups if any(q is p for q in g["params"]))
                    assert s % (m * k) == 0 and e % (m * k) == 0, "Muon's matrices whole"
                    flops[r] += (e - s) * min(m, k)
                else:
                    has_adam[r] |= e > s
            assert owners.eq(1).all(), "each element owned by exactly one rank"
        # Muon's FLOPs within one matrix's of even
        assert max(flops) - min(flops) <= max(g["matrix"][0] * g["matrix"][1] * min(g["matrix"])
                                              for g in muon.param_groups)
        # levelled: the ranks holding Adam elements differ by at most one element, and a rank longer than them
        # holds no Adam (its matrices alone make it so: the padding the whole units force)
        level = max(l for l, a in zip(length, has_adam) if a)
        assert all(l >= level - 1 and (l <= level or not a) for l, a in zip(length, has_adam)), (n, length)
        if vocab_size == 50257:
            assert max(length) - min(length) <= 1
        # every bucket's segments as wide as the longest rank's part of it: only the last can be short
        reducer = tg.GradientReducer(tg.gradient_order(model), ranges, 0, n, torch.bfloat16, 1 << 20)
        step = (1 << 20) // (4 * n)
        assert reducer.widths[:-1] == [step] * (len(reducer.widths) - 1) and sum(reducer.widths) == max(length)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_reduce_scatter_sends_no_more_than_an_all_reduce_in_bf16(world_size):
    # the reduce-scatter and the all_gather of every bucket, per rank and step, against a ring all-reduce of every
    # gradient in bf16: 2 (n - 1) / n S 2 bytes, less than 2 bytes a rank more each way (S / n rounded up)
    args = dataclasses.replace(tiny_gpt_args(), grad_reduce="reduce_scatter", bucket_mb=1)
    for device in ("cuda", "cpu"):
        b = comm_bytes.comm_bytes(args, world_size, device)
        assert b["reduce_scatter"] == b["all_gather"]
        assert b["reduce_scatter"] + b["all_gather"] <= b["all_reduce_bf16"] + 4 * (world_size - 1)
    fp32 = comm_bytes.comm_bytes(dataclasses.replace(args, grad_reduce="reduce_scatter_fp32"), world_size)
    assert fp32["reduce_scatter"] == fp32["all_gather"] == 2 * b["all_gather"]  # both ways in fp32


# -----------------------------------------------------------------------------
# the gradient reducer on 2 and 3 gloo processes: what each rank receives, in bf16 and fp32, and when

REDUCER_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gpt as tg
rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=world)
torch.manual_seed(0)
# a chain of three layers, a stack of matrices and a vector: hooks fire in backward order, layer by layer
layers = [torch.nn.Parameter(torch.randn(24, 24) * 0.2) for _ in range(3)]
stack, vector = torch.nn.Parameter(torch.randn(5, 8, 24) * 0.2), torch.nn.Parameter(torch.randn(24))
order = list(reversed(layers)) + [stack, vector]
ranges = tg.shard_owners(order, {{id(p): tuple(p.shape[-2:]) for p in layers + [stack]}}, world)
# one layer a rank in each bucket: on 2 ranks [layer 2 | layer 1], [layer 0 | 3 of the stack's 5], [2 of them | vector]
reducer = tg.GradientReducer(order, ranges, rank, world, getattr(torch, {dtype!r}), bucket_bytes=2 * 24 * 24 * 4)
events = []
launch = reducer.launch
reducer.launch = lambda b: (events.append(("launch", b)), launch(b))
for p in order:
    p.register_post_accumulate_grad_hook(lambda p: events.append(("grad", next(i for i, q in enumerate(order) if q is p))))
out = {{}}
for micro in range(2):
    if micro == 1:
        reducer.arm()
        events.append(("arm", -1))
    gen = torch.Generator().manual_seed(100 * rank + micro)
    x = torch.randn(7, 24, generator=gen)
    h = x + vector
    for w in layers:
        h = torch.tanh(h @ w.T)
    loss = (h * torch.randn(7, 24, generator=gen)).sum() + (stack * torch.randn(5, 8, 24, generator=gen)).sum()
    loss.backward()
reducer.finish()
out["events"] = events
out["reduced"] = {{i: reducer.reduced(p).tolist() for i, p in enumerate(order) if id(p) in reducer.views}}
out["grads"] = {{i: p.grad.view(-1).tolist() for i, p in enumerate(order)}}
out["ranges"] = {{i: reducer.ranges[id(p)][rank] for i, p in enumerate(order)}}
json.dump(out, open(f"{out_dir}/rank{{rank}}.json", "w"))
dist.destroy_process_group()
"""


def run_reducer(tmp_path, world: int, dtype: str) -> list[dict]:
    return run_workers(tmp_path, world, REDUCER_WORKER.format(root=str(ROOT), store=tmp_path / "store",
                                                              out_dir=tmp_path, dtype=dtype))


def run_workers(tmp_path, world: int, code: str) -> list[dict]:
    # `world` gloo processes of `code`, each writing rank<r>.json to tmp_path
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_rank_receives_the_summed_gradient_of_what_it_owns(tmp_path, world, dtype):
    ranks = run_reducer(tmp_path, world, dtype)
    for i in ranks[0]["grads"]:
        # the local gradients (two micro-steps accumulated) of every rank, summed here in float64
        local = torch.tensor([r["grads"][i] for r in ranks], dtype=torch.float64)
        exact, magnitude = local.sum(0), local.abs().sum(0)
        covered = torch.zeros_like(exact, dtype=torch.int64)
        for r in ranks:
            s, e = r["ranges"][i]
            covered[s:e] += 1
            if e > s:
                got = torch.tensor(r["reduced"][i], dtype=torch.float64)
                if dtype == "float32":
                    torch.testing.assert_close(got, exact[s:e], rtol=1e-6, atol=1e-6)
                else:
                    # each input rounded to bf16 (2^-9 relative) and each of the world-1 partial sums rounded
                    # again: at most world x 2^-8 of the sum of magnitudes
                    assert ((got - exact[s:e]).abs() <= world * 2 ** -8 * magnitude[s:e] + 1e-30).all()
                    assert not torch.equal(got, exact[s:e])  # it did go through bf16
        assert covered.eq(1).all(), f"parameter {i}: each element reduced to exactly one rank"


def test_buckets_go_out_during_the_backward(tmp_path):
    # bucket 0 (the last two layers, whose gradients are final first) is sent before the first layer's exists
    events = [tuple(e) for e in run_reducer(tmp_path, 2, "float32")[0]["events"]]
    first_layer = 2  # order = reversed(layers): index 2 is layers[0], the last gradient of the chain
    last_micro = events[events.index(("arm", -1)):]
    assert last_micro.index(("launch", 0)) < last_micro.index(("grad", first_layer))
    assert [b for kind, b in events if kind == "launch"] == sorted(b for kind, b in events if kind == "launch")


class FakeWork:
    # an async collective's handle that records its wait
    def __init__(self, events: list, kind: str, b: int):
        self.events, self.kind, self.b = events, kind, b

    def wait(self):
        self.events.append(("wait " + self.kind, self.b))


def faked_reducer(monkeypatch, bucket_mb: int):
    # rank 0 of 2 on the tiny MoE model, its reducer laid out in optimizer_order, with the collectives faked: they
    # record when each bucket's reduce-scatter and all_gather are issued and waited, and copy rank 0's part
    args = dataclasses.replace(tiny_gpt_args(), grad_reduce="reduce_scatter", bucket_mb=bucket_mb)
    torch.manual_seed(0)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args, 0, 2, torch.device("cpu"))
    ranges = {k: v for opt in optimizers for k, v in opt.ranges.items()}
    order = tg.optimizer_order(optimizers)
    reducer = tg.GradientReducer(order, ranges, 0, 2, torch.bfloat16, bucket_mb << 20)
    events, buckets = [], {}
    buckets.update({id(out): b for b, out in enumerate(reducer.outputs)})
    buckets.update({id(g): b for b, g in enumerate(reducer.gathered)})

    def reduce_scatter(out, inp, async_op):
        out.copy_(inp[:out.numel()])
        events.append(("reduce_scatter", buckets[id(out)]))
        return FakeWork(events, "reduce_scatter", buckets[id(out)])

    def all_gather(out, inp, async_op):
        out.view(2, -1)[0].copy_(inp)
        events.append(("all_gather", buckets[id(out)]))
        return FakeWork(events, "all_gather", buckets[id(out)])

    monkeypatch.setattr(tg.dist, "reduce_scatter_tensor", reduce_scatter)
    monkeypatch.setattr(tg.dist, "all_gather_into_tensor", all_gather)
    return model, optimizers, order, reducer, events


@pytest.mark.parametrize("bucket_mb", [1, 4])
def test_optimizers_start_on_the_first_buckets_while_the_rest_are_reduced(monkeypatch, bucket_mb):
    # the compiled backward finishes every gradient at once, so finish() sends all buckets; then the optimizers must
    # wait for them one by one, in order, as they read them (the buckets laid out in optimizer_order), not all before
    # the first step
    model, optimizers, order, reducer, events = faked_reducer(monkeypatch, bucket_mb)
    assert sorted(map(id, order)) == sorted(id(p) for p in model.parameters())  # every parameter once
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reducer.finish()
    count = len(reducer.widths)
    assert count >= 3 and events == [("reduce_scatter", b) for b in range(count)]  # all sent, none waited for
    for opt in optimizers:
        opt.step(reducer)
    reducer.apply()
    waits = [b for kind, b in events if kind == "wait reduce_scatter"]
    assert waits == list(range(count)), waits  # read in order: each optimizer waits only for what it reads
    for b in range(count):  # the gather overwrites the reduce-scatter's input: never before that has arrived
        assert events.index(("wait reduce_scatter", b)) < events.index(("all_gather", b))
    # Adam's results go back while Muon still waits for its gradients (with 4 MiB buckets the tiny model's last
    # bucket holds Adam's last elements and all of Muon's: nothing can go back before it)
    first_gather = next(i for i, (kind, _) in enumerate(events) if kind == "all_gather")
    assert (first_gather < events.index(("wait reduce_scatter", count - 1))) == (bucket_mb == 1)


def test_a_bucket_is_gathered_only_after_its_reduce_scatter_arrived_even_unread(monkeypatch):
    # a rank that reads nothing of a bucket (its stream ends before it, or it owns none of the bucket's parameters)
    # never waits in reduced(): gather() must wait itself, as the all_gather lands in the reduce-scatter's input
    _, _, order, reducer, events = faked_reducer(monkeypatch, 1)
    reducer.finish()
    reducer.done(order, 1.0)  # every parameter done, none read
    reducer.apply()
    count = len(reducer.widths)
    assert sorted(b for kind, b in events if kind == "all_gather") == list(range(count))
    for b in range(count):
        assert events.index(("wait reduce_scatter", b)) < events.index(("all_gather", b)), b


LATE_WORKER = """
import atexit, sys, torch
sys.path.insert(0, {root!r})
import train_gpt
issue, late = train_gpt.dist.reduce_scatter_tensor, []


class Late:
    # a reduce-scatter whose output lands only when it is waited for: what reads it before finds NaN
    def __init__(self, out, inp):
        self.out, self.landing = out, torch.empty_like(out)
        self.work = issue(self.landing, inp, async_op=True)
        out.fill_(float("nan"))
        late.append(self)

    def wait(self):
        self.work.wait()
        self.out.copy_(self.landing)


train_gpt.dist.reduce_scatter_tensor = lambda out, inp, async_op: Late(out, inp)
atexit.register(lambda: print(f"late reduce-scatters: {{len(late)}}"))
if {optimizer_order!r}:  # the compiled model's layout (the CPU runs eager, whose layout is gradient order)
    build, Reducer, built = train_gpt.build_optimizers, train_gpt.GradientReducer, []
    train_gpt.build_optimizers = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    train_gpt.GradientReducer = lambda params, *a: Reducer(train_gpt.optimizer_order(built[-1]), *a)
train_gpt.main()
"""


@pytest.mark.parametrize("world,optimizer_order", [(2, False), (3, False), (2, True)])
def test_every_read_of_a_reduced_gradient_waits_for_its_bucket(shards, tmp_path, world, optimizer_order):
    # 2 and 3 ranks (uneven shares) of 2 micro-steps, the reduce-scatters landing only when waited for (NaN until
    # then): the optimizers must read each bucket after its wait, so the run trains exactly as with plain ones; in
    # gradient order (eager) and in the optimizers' order (compiled)
    settings = dict(NUM_EXPERTS=3, TOP_K=2, EXPERT_HIDDEN=256, SHARED_EXPERTS=1, MOE_LAYERS=1, BUCKET_MB=1,
                    TRAIN_BATCH_TOKENS=512 * world, VAL_SEQ_LEN=256, VAL_TOKENS=1536, NUM_ITERATIONS=4,
                    VAL_LOSS_EVERY=2, GRAD_REDUCE="reduce_scatter_fp32")
    script = tmp_path / "late.py"
    script.write_text(LATE_WORKER.format(root=str(ROOT), optimizer_order=optimizer_order))
    late = launch(script, tiny_env(shards, tmp_path / "late", **settings), world, cwd=tmp_path)
    assert late.returncode == 0, late.stderr[-3000:]
    counts = [int(n) for n in re.findall(r"late reduce-scatters: (\d+)", late.stdout)]
    assert len(counts) == world and len(set(counts)) == 1 and counts[0] > 4 and counts[0] % 4 == 0, late.stdout
    plain = launch(ROOT / "train_gpt.py", tiny_env(shards, tmp_path / "plain", **settings), world, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    losses = val_losses((tmp_path / "late" / "logs" / "tiny.txt").read_text())
    assert losses == val_losses((tmp_path / "plain" / "logs" / "tiny.txt").read_text()) and len(losses) == 3


# -----------------------------------------------------------------------------
# ShardedAdamW on 2 and 3 gloo processes: fp32 and bf16 parameters (the GPU's embeddings are bf16, the CPU's fp32)

ADAM_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gpt as tg
rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=world)
torch.manual_seed(0)
shapes = [(40, 8), (7,), (30, 8), (3,), (50,), (2, 2)]
dtypes = [torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
start = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
params = [torch.nn.Parameter(t.clone()) for t in start]
plain = [torch.nn.Parameter(t.clone()) for t in start]
groups = lambda ps: [dict(params=ps[:3], lr=0.1), dict(params=ps[3:], lr=0.02)]
ranges = tg.shard_owners(params, {{}}, world)
sharded = tg.ShardedAdamW(groups(params), ranges, rank, betas=(0.8, 0.95), eps=1e-10)
dtype = getattr(torch, {dtype!r})
reducer = tg.GradientReducer(params, ranges, rank, world, dtype, bucket_bytes=1024)  # 3 buckets, ranges cut between them
reference = torch.optim.AdamW(groups(plain), betas=(0.8, 0.95), eps=1e-10)
for step in range(3):
    for p, q in zip(params, plain):
        # the summed gradient (bf16 values: the bf16 reduction is exact): rank 0's, the others' zero
        q.grad = torch.randn(p.shape).bfloat16().to(p.dtype)
        p.grad = q.grad.clone() if rank == 0 else torch.zeros_like(p)
    reducer.finish()
    sharded.step(reducer)
    reducer.apply()
    # the plain reference: AdamW on whole parameters; with bf16 results an fp32 parameter moves by its step rounded
    before = [q.detach().clone() for q in plain]
    reference.step()
    for q, b in zip(plain, before):
        if q.dtype == torch.float32 and dtype == torch.bfloat16:
            q.data = b + (q.detach() - b).bfloat16().float()
out = dict(start=[t.float().view(-1).tolist() for t in start],
           params=[p.detach().float().view(-1).tolist() for p in params],
           reference=[q.detach().float().view(-1).tolist() for q in plain],
           owned=[ranges[id(p)][rank] for p in params],
           state=sum(s["exp_avg"].numel() for s in sharded.state.values()),
           buckets=len(reducer.widths))
json.dump(out, open(f"{out_dir}/rank{{rank}}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # GRAD_REDUCE=reduce_scatter_fp32 and reduce_scatter
def test_sharded_adam_gives_every_rank_each_owners_step_in_both_dtypes(tmp_path, world, dtype):
    ranks = run_workers(tmp_path, world, ADAM_WORKER.format(root=str(ROOT), store=tmp_path / "store",
                                                            out_dir=tmp_path, dtype=dtype))
    sizes = [320, 7, 240, 3, 50, 4]
    for i, size in enumerate(sizes):
        owners = torch.zeros(size, dtype=torch.int64)
        for r in ranks:
            owners[slice(*r["owned"][i])] += 1
        assert owners.eq(1).all(), "each element stepped by one rank"
    assert sum(r["state"] for r in ranks) == sum(sizes), "each rank keeps the moments of what it owns only"
    assert ranks[0]["buckets"] == 3
    for r in ranks:
        # every rank holds exactly what the plain reference computes, in both dtypes, the owner too
        assert r["params"] == r["reference"]
        assert all(p != s for p, s in zip(r["params"], r["start"]))


# -----------------------------------------------------------------------------
# whole runs: 1, 2 and 3 processes with accumulation give the same training

def run_tiny(shards, out, nproc: int, **settings) -> str:
    # several processes run under bench/trace_collectives.py, and every rank must have issued rank 0's collectives
    out.mkdir(parents=True, exist_ok=True)
    env = tiny_env(shards, out, NUM_ITERATIONS=4, VAL_LOSS_EVERY=2, SAVE_CHECKPOINT=1, **settings)
    proc = launch(ROOT / ("bench/trace_collectives.py" if nproc > 1 else "train_gpt.py"), env, nproc, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if nproc > 1:
        assert_same_collectives(out, nproc, settings.get("GRAD_REDUCE", "all_reduce"), "RESUME" in settings)
    return (out / "logs" / "tiny.txt").read_text()


def assert_same_collectives(out, nproc: int, grad_reduce: str, resumed: bool = False):
    # NCCL hangs, or reads past a buffer, where ranks differ in a collective's kind, order, dtype or shape
    ranks = [[json.loads(line)["call"] for line in (out / f"collectives_rank{r}.jsonl").read_text().splitlines()]
             for r in range(nproc)]
    for r in range(1, nproc):
        pairs = enumerate(zip(ranks[0], ranks[r]))
        first = next((i for i, (a, b) in pairs if a != b), min(len(ranks[0]), len(ranks[r])))
        assert ranks[r] == ranks[0], (f"rank {r} parts from rank 0 at collective {first}: {ranks[r][first:first + 1]} "
                                      f"against {ranks[0][first:first + 1]}")
    names = {call[0] for call in ranks[0]}
    assert ("reduce_scatter_tensor" in names) == (grad_reduce != "all_reduce") and "all_gather_into_tensor" in names
    # the clock starts after one barrier, when every rank has compiled: before it only the weights' broadcast (the
    # CPU does not compile, so no warmup steps come first), and on a resume the ranks' one all_reduce agreeing that
    # the optimizer state fits
    kinds = [call[0] for call in ranks[0]]
    before = kinds[:kinds.index("barrier")]
    assert kinds.count("barrier") == 1 and set(before) - {"broadcast"} == ({"all_reduce"} if resumed else set())
    assert before.count("all_reduce") == resumed


def val_losses(log: str) -> list[float]:
    return [float(line.split("val_loss:")[1].split()[0]) for line in log.splitlines()
            if line.startswith("step:") and "val_loss:" in line]


@pytest.mark.parametrize("moe", [False, True])
def test_three_processes_match_one_with_accumulation(shards, tmp_path, moe):
    # 1536 tokens a step: 1 process x 6 micro-steps against 3 processes x 2 micro-steps: all_reduce, reduce_scatter
    # in fp32 and in bf16
    settings = dict(TRAIN_BATCH_TOKENS=1536, TRAIN_SEQ_LEN=256, VAL_SEQ_LEN=256, VAL_TOKENS=1536)
    if moe:
        settings |= dict(NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, SHARED_EXPERTS=1)
    one = val_losses(run_tiny(shards, tmp_path / "one", 1, **settings))
    all_reduce = val_losses(run_tiny(shards, tmp_path / "all_reduce", 3, **settings))
    three = val_losses(run_tiny(shards, tmp_path / "three", 3, GRAD_REDUCE="reduce_scatter_fp32", **settings))
    bf16 = val_losses(run_tiny(shards, tmp_path / "bf16", 3, GRAD_REDUCE="reduce_scatter", **settings))
    assert one[-1] < one[0] - 1
    assert three == pytest.approx(one, abs=2e-4) and all_reduce == pytest.approx(one, abs=2e-4)  # other orders
    assert bf16 == pytest.approx(one, abs=2e-2) and bf16 != three  # bf16 gradients: close, not the same


@pytest.mark.parametrize("grad_reduce", ["all_reduce", "reduce_scatter", "reduce_scatter_fp32"])
def test_two_processes_with_uneven_shares_issue_the_same_collectives(shards, tmp_path, grad_reduce):
    # 2 ranks: Muon's groups of 3 dense matrices split 2/1, the shared expert's two single matrices leave one rank
    # nothing in their groups, the Adam parameters split unevenly, 7 buckets; run_tiny compares the ranks' collectives
    settings = dict(NUM_EXPERTS=3, TOP_K=2, EXPERT_HIDDEN=256, SHARED_EXPERTS=1, MOE_LAYERS=1, BUCKET_MB=1,
                    TRAIN_BATCH_TOKENS=1024, GRAD_REDUCE=grad_reduce)
    losses = val_losses(run_tiny(shards, tmp_path, 2, **settings))
    assert losses[-1] < losses[0] - 1
    if grad_reduce != "all_reduce":
        # bench/comm_bytes.py's count is what the ranks sent: a ring reduce-scatter sends (n - 1) / n of its input
        # from each rank, an all_gather (n - 1) times its input; 4 steps, no other call of these two
        itemsize = {"torch.float32": 4, "torch.bfloat16": 2}
        sent = 0
        for line in (tmp_path / "collectives_rank0.jsonl").read_text().splitlines():
            name, *tensors = json.loads(line)["call"]
            if name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
                (dtype, shape), = [t for t in tensors if isinstance(t, list)][1:]  # the input, after the output
                sent += math.prod(shape) * itemsize[dtype] * (1 / 2 if name == "reduce_scatter_tensor" else 1)
        counted = comm_bytes.comm_bytes(tg.load_config(tiny_env(shards, tmp_path, **settings)), 2, "cpu")
        assert sent / 4 == counted["reduce_scatter"] + counted["all_gather"]


@pytest.mark.parametrize("grad_reduce", ["all_reduce", "reduce_scatter"])
def test_two_process_resume_continues_exactly(shards, tmp_path, grad_reduce):
    # each rank's share of the optimizer state goes into the checkpoint and comes back to the same rank
    settings = dict(NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128, SAVE_EVERY=2, GRAD_REDUCE=grad_reduce)
    whole = run_tiny(shards, tmp_path / "whole", 2, **settings)
    ckpt = tmp_path / "whole" / "ckpt" / "tiny" / "step_000002.pt"
    assert torch.load(ckpt)["world_size"] == 2 and len(torch.load(ckpt)["optimizers"]) == 2
    resumed = run_tiny(shards, tmp_path / "resumed", 2, RESUME=str(ckpt), **settings)
    assert val_losses(resumed)[-1] == val_losses(whole)[-1]
    proc = launch(ROOT / "train_gpt.py", tiny_env(shards, tmp_path, RUN_ID="one", RESUME=str(ckpt), NUM_ITERATIONS=4,
                                                  NUM_EXPERTS=4, TOP_K=2, EXPERT_HIDDEN=128), 1, cwd=tmp_path)
    assert proc.returncode == 2 and "written by 2 processes and this run has 1" in proc.stderr
    if grad_reduce == "reduce_scatter":
        # rank 1's part split otherwise, rank 0's intact: both ranks refuse (rank 0 carried on before), one line
        tampered = torch.load(ckpt, weights_only=False)
        for group in tampered["optimizers"][1][0]["param_groups"]:
            group["ranges"] = [[0, 0] for _ in group["ranges"]]
        torch.save(tampered, tmp_path / "tampered.pt")
        proc = launch(ROOT / "train_gpt.py", tiny_env(shards, tmp_path, RUN_ID="tampered", RESUME=str(tmp_path / "tampered.pt"),
                                                      **settings), 2, cwd=tmp_path)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "split over the ranks otherwise" in errors[0], proc.stderr[-3000:]
        assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr


# -----------------------------------------------------------------------------
# bench/exposed_comm.py: NCCL time with no other kernel running

def test_exposed_communication_is_nccl_time_not_covered_by_compute():
    def kernel(name, ts, dur):
        return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur)
    events = [kernel("gemm", 0, 100), kernel("elementwise", 90, 30),  # compute 0-120
              kernel("ncclDevKernel_ReduceScatter", 50, 100),  # 50-150: 120-150 exposed
              kernel("ncclDevKernel_AllGather", 200, 40),  # 200-240: all exposed
              kernel("gemm", 230, 70), dict(ph="X", cat="cpu_op", name="nccl:all_gather", ts=0, dur=1000)]
    r = exposed_comm.exposed(events)
    assert r["span_ms"] == pytest.approx(0.300) and r["comm_ms"] == pytest.approx(0.140)
    assert r["compute_ms"] == pytest.approx(0.190) and r["exposed_ms"] == pytest.approx(0.060)
    rows = exposed_comm.by_kernel(events + [kernel("ncclDevKernel_AllGather(int, char*)", 400, 10)])
    assert set(rows) == {"ncclDevKernel_ReduceScatter", "ncclDevKernel_AllGather"}  # arguments cut off
    assert rows["ncclDevKernel_ReduceScatter"] == pytest.approx(dict(count=1, ms=0.100, exposed_ms=0.030))
    # 200-230 and 400-410 exposed
    assert rows["ncclDevKernel_AllGather"] == pytest.approx(dict(count=2, ms=0.050, exposed_ms=0.040))


def test_exposed_comm_reads_a_compressed_trace(tmp_path):
    events = [dict(ph="X", cat="kernel", name="gemm", ts=0, dur=100),
              dict(ph="X", cat="kernel", name="ncclDevKernel_AllGather", ts=80, dur=40)]
    with lzma.open(tmp_path / "t.json.xz", "wt") as f:
        json.dump(dict(traceEvents=events), f)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "exposed_comm.py"), str(tmp_path / "t.json.xz"),
                        "--steps", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ncclDevKernel_AllGather: 1 launches; per step 0.02 ms, 0.01 ms exposed",
                                     "span 0.1 ms, kernels busy 0.1 ms, NCCL 0.0 ms, NCCL with no other kernel running "
                                     "0.0 ms = 16.67% of the span, per step 0.06 ms span, 0.01 ms exposed"]


def test_resume_keeps_the_optimizer_state_and_takes_this_runs_settings():
    args = tiny_gpt_args()
    torch.manual_seed(0)
    model = tg.GPT(args)
    before = tg.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for opt in before:
        opt.step()
    states = [opt.state_dict() for opt in before]
    after = tg.build_optimizers(model, dataclasses.replace(args, expert_lr_mult=0.5, head_lr=0.01, ns_steps=3),
                                0, 1, torch.device("cpu"))
    tg.load_optimizer_states(after, states, "old.pt")
    moe = model.blocks[0].mlp
    muon = after[1]
    expert_group = next(g for g in muon.param_groups if any(p is moe.w1 for p in g["params"]))
    assert expert_group["initial_lr"] == expert_group["lr"] == args.muon_lr * 0.5 and expert_group["ns_steps"] == 3
    head_group = next(g for g in after[0].param_groups if any(p is model.lm_head.weight for p in g["params"]))
    assert head_group["initial_lr"] == 0.01
    torch.testing.assert_close(muon.state[moe.w1]["momentum_buffer"], before[1].state[moe.w1]["momentum_buffer"])


def test_resume_refuses_optimizers_grouped_otherwise():
    # a checkpoint of an older train_gpt.py whose AdamW had no group of its own for the experts
    args = dataclasses.replace(tiny_gpt_args(), matrix_optimizer="adamw", expert_lr_mult=0.5)
    model = tg.GPT(args)
    optimizers = tg.build_optimizers(model, args, 0, 1, torch.device("cpu"))
    states = [opt.state_dict() for opt in optimizers]
    merged = copy.deepcopy(states)
    groups = merged[-1]["param_groups"]
    groups[-2]["params"] += groups.pop()["params"]
    with pytest.raises(tg.ConfigError, match=r"RESUME=old.pt: its optimizers group the parameters differently"):
        tg.load_optimizer_states(optimizers, merged, "old.pt")
    tg.load_optimizer_states(optimizers, states, "old.pt")


def test_resume_refuses_another_adam_sharding():
    args = tg.Hyperparameters(resume="old.pt", grad_reduce="all_reduce")
    ckpt = dict(world_size=2, args=dataclasses.asdict(dataclasses.replace(args, grad_reduce="reduce_scatter")))
    with pytest.raises(tg.ConfigError, match="trained with GRAD_REDUCE=reduce_scatter, whose optimizer state is split "
                                             r"element by element \(shard_owners\); resume with GRAD_REDUCE=reduce_scatter"):
        tg.check_settings(ckpt, args, 2)
    tg.check_settings(ckpt, dataclasses.replace(args, grad_reduce="reduce_scatter_fp32"), 2)  # same sharding
    tg.check_settings(dict(ckpt, world_size=1), args, 1)  # one process: nothing is split


def test_resume_refuses_optimizer_state_split_otherwise():
    # GRAD_REDUCE=reduce_scatter: rank 0's state on 2 ranks does not fit rank 0 on 3, nor one of the whole-parameter
    # Adam owners of older versions (their groups hold no ranges); the same layout loads
    args = dataclasses.replace(tiny_gpt_args(), grad_reduce="reduce_scatter")
    model = tg.GPT(args)
    two, three = (tg.build_optimizers(model, args, 0, n, torch.device("cpu")) for n in (2, 3))
    older = [opt.state_dict() for opt in two]
    for group in older[0]["param_groups"]:
        del group["ranges"]
    for states in ([opt.state_dict() for opt in three], older):
        with pytest.raises(tg.ConfigError, match=r"^RESUME=old.pt: its optimizer state is split over the ranks "
                                                 r"otherwise than this run's .*; resume with the settings"):
            tg.load_optimizer_states(two, states, "old.pt")
    tg.load_optimizer_states(two, [opt.state_dict() for opt in two], "old.pt")


def test_exposed_comm_refuses_what_is_not_a_trace(tmp_path):
    for text in ('{"foo": 1}', "[1, 2]"):
        (tmp_path / "t.json").write_text(text)
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "exposed_comm.py"), str(tmp_path / "t.json")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def xz_bytes(events) -> bytes:
    return lzma.compress(json.dumps(dict(traceEvents=events)).encode())


gemm = dict(ph="X", cat="kernel", name="gemm", ts=0, dur=100)


@pytest.mark.parametrize("name, content, steps, says", [
    ("t.json.xz", xz_bytes([gemm] * 50)[:-20], 0, "Compressed file ended"),  # a copy cut short
    ("t.json.xz", b"", 0, "cannot read"),
    ("t.json", b'{"traceEvents": []}', 0, "no GPU kernels"),
    ("t.json", json.dumps([dict(gemm, dur=0)]).encode(), 0, "no GPU kernels"),  # kernels that span no time
    ("t.json", json.dumps([dict(ph="X", cat="kernel", ts=0, dur=5)]).encode(), 0, "kernel event"),  # no name
    ("t.json", json.dumps([dict(gemm, ts="0")]).encode(), 0, "kernel event"),
    ("t.json", None, -1, "--steps -1"),  # checked before the (missing, or long to read) trace
], ids=["cut_xz", "empty_xz", "no_kernels", "zero_span", "no_name", "text_ts", "negative_steps"])
def test_exposed_comm_gives_one_error_line_for_a_broken_trace(tmp_path, name, content, steps, says):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "exposed_comm.py"), str(tmp_path / name),
                        "--steps", str(steps)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_exposed_comm_reads_a_compressed_trace_whatever_its_name(tmp_path):
    (tmp_path / "t.json").write_bytes(xz_bytes([gemm, dict(gemm, name="ncclDevKernel_AllGather", ts=80, dur=40)]))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "exposed_comm.py"), str(tmp_path / "t.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "NCCL with no other kernel running 0.0 ms = 16.67% of the span" in r.stdout, r.stderr


# -----------------------------------------------------------------------------
# bench/trace_collectives.py --stacks-every: every thread's stack, from a Python thread (faulthandler's segfaulted)

def parked_by_name(release):
    release.wait()


def parked_without_a_name(lock):
    lock.acquire()


def test_stack_dumps_hold_every_thread_by_name_every_period(tmp_path):
    release, lock = threading.Event(), _thread.allocate_lock()
    lock.acquire()
    threading.Thread(target=parked_by_name, args=(release,), name="parked-1", daemon=True).start()
    _thread.start_new_thread(parked_without_a_name, (lock,))  # threading does not know it: no name
    path, start = tmp_path / "stacks.txt", time.perf_counter()
    stop = trace_collectives.start_stack_dumps(0.2, path, start)
    while len(re.findall(r"^--- ", path.read_text(), flags=re.M)) < 2 and time.perf_counter() < start + 30:
        time.sleep(0.05)
    stop()
    release.set()
    lock.release()
    dumps = re.split(r"^--- ", path.read_text(), flags=re.M)[1:]  # each after its header '--- T s' (stacks indented)
    assert len(dumps) >= 2
    for dump in dumps:
        seconds, threads = dump.split(" s\n", 1)
        assert float(seconds) >= 0.2
        by_name = {t.split(" (")[0]: t for t in ("\n" + threads).split("\nThread ")[1:]}
        assert {"MainThread", "parked-1", "<no Python thread>"} <= set(by_name) and "stack dumps" not in by_name
        assert "in test_stack_dumps_hold_every_thread_by_name_every_period" in by_name["MainThread"]
        assert "in parked_by_name" in by_name["parked-1"] and "in parked_without_a_name" in by_name["<no Python thread>"]


def test_trace_collectives_refuses_a_negative_period(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_collectives.py"), "--stacks-every", "-1",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --stacks-every -1 ") and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists(), "refused before anything ran"


# -----------------------------------------------------------------------------
# a refused setting under a raw torchrun: one error line for the node, not one per process

@pytest.mark.parametrize("bad", [dict(NUM_EXPERTS=-1), dict(NUM_EXPERTS=4, TOP_K=5)])
def test_torchrun_prints_a_refused_setting_once(shards, tmp_path, bad):
    proc = launch(ROOT / "train_gpt.py", tiny_env(shards, tmp_path, **bad), 2, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and list(bad)[-1] in errors[0], proc.stderr
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr  # torchrun's status for a worker that exited 2
    assert not (tmp_path / "logs").exists()
