# Where a training step's time goes: median forward+backward and optimizer times of the compiled model on real
# tokens (settings from the environment, as train_gpt.py reads them), Muon's share of the step, and the top GPU
# kernels of a few profiled steps. Usage: TRAIN_FILES=... NUM_EXPERTS=8 python bench/step_profile.py [--steps 30]
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg


def main():
    ap = argparse.ArgumentParser(description="Where a training step's time goes on the GPU: forward+backward, "
                                 "optimizers and Muon, and the top kernels (settings from the environment, as "
                                 "train_gpt.py reads them)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kernels", type=int, default=25, help="rows of the kernel table (0 = no profile)")
    opts = ap.parse_args()
    try:
        args = tg.load_config(dict(os.environ))
        train_files = tg.find_shards(args.train_files, "TRAIN_FILES")
    except (tg.ConfigError, tg.DataError) as e:
        ap.exit(2, f"error: {e}\n")
    if not torch.cuda.is_available():
        ap.exit(2, "error: bench/step_profile.py times CUDA events: run it on a GPU\n")
    device = tg.pick_device(0)
    torch.manual_seed(args.seed)
    model = tg.GPT(args).to(device)
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.to(torch.bfloat16)
    model.fp8_head = args.fp8_head and tg.has_fp8(device)
    optimizers = tg.build_optimizers(model, args, 0, 1, device)
    moes = [m for m in model.modules() if isinstance(m, tg.MoE)]
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    loader = tg.DataLoader(train_files, args.train_seq_len, args.train_seq_len, 0, 1, device)
    window = torch.tensor(tg.window_blocks_at(args.num_iterations // 2, args), dtype=torch.int32, device=device)

    def fwd_bwd():
        (inputs, targets), = loader.next_batch()
        ce, aux = compiled(inputs, targets, window)
        (ce + aux).backward()

    def opt_step():
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if moes and args.bias_update_rate:
            tg.update_router_bias(moes, args.bias_update_rate, 1)

    t0 = time.perf_counter()
    for _ in range(5):
        fwd_bwd()
        opt_step()
    torch.cuda.synchronize()
    print(f"warmup (compile) {time.perf_counter() - t0:.1f}s")
    times = {"forward+backward": [], "optimizers": [], "muon": []}
    for _ in range(opts.steps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        fwd_bwd()
        events[1].record()
        for opt in optimizers:
            if isinstance(opt, tg.Muon):
                events[2].record()
                opt.step()
                events[3].record()
            else:
                opt.step()
        model.zero_grad(set_to_none=True)
        if moes and args.bias_update_rate:
            tg.update_router_bias(moes, args.bias_update_rate, 1)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        times["forward+backward"].append(events[0].elapsed_time(events[1]))
        times["optimizers"].append(events[1].elapsed_time(end))
        if any(isinstance(o, tg.Muon) for o in optimizers):
            times["muon"].append(events[2].elapsed_time(events[3]))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}
    step = med["forward+backward"] + med["optimizers"]
    print(f"config: experts={args.num_experts} top_k={args.top_k} router={args.router} optimizer={args.matrix_optimizer}")
    for k, v in med.items():
        print(f"{k}: {v:.2f} ms (median of {opts.steps}) = {100 * v / step:.1f}% of the step")
    print(f"step (sum of medians): {step:.2f} ms")
    print(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2 ** 20} MiB")
    if opts.kernels:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
                opt_step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=opts.kernels, max_name_column_width=90))


if __name__ == "__main__":
    main()
