# Where a training step's time goes: median forward+backward and optimizer times of the compiled model on real
# tokens (settings from the environment, as train_gpt.py reads them), Muon's share of the step, the GPU kernel time
# of a few profiled steps by kind (GEMM, attention, gathers and scatters, ...) and the top kernels. --save writes the
# kinds to a JSON file, --against prints another run's beside them with the difference: run it for dense and for the
# MoE, and the difference is where the MoE's extra time goes.
# Usage: TRAIN_FILES=... NUM_EXPERTS=8 python bench/step_profile.py [--steps 30] [--save F.json] [--against G.json]
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg

# a kernel's kind from its name, first match wins. Inductor's fused kernels (triton_poi/per/red_fused_<ops>) name the
# ops they fuse: one whose ops index, gather or scatter holds the MoE's permutations (and whatever fused with them);
# its templates (triton_tem) are GEMMs unless FlexAttention's. train_gpt.py's own Triton kernels are named by their
# function, found in its source
OWN_KERNELS = frozenset(re.findall(r"^\s*def (\w+_kernel)\(", Path(tg.__file__).read_text(), re.M))
GEMM_WORDS = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitkreduce", "wgmma")
KINDS = ("GEMM", "attention", "gather/scatter", "elementwise/reduction", "train_gpt.py Triton", "sort", "NCCL",
         "copy/memset", "other")


def kernel_kind(name: str) -> str:
    low = name.lower()
    fused = re.match(r"triton_([a-z]{3})_fused_?(.*)", low)  # Inductor's category, cut to 3 letters (poi, for, spl)
    if "nccl" in low:
        return "NCCL"
    if "flex_attention" in low or "flash" in low:
        return "attention"
    if name in OWN_KERNELS:
        return "train_gpt.py Triton"
    if fused:
        if fused[1] == "tem":
            return "GEMM"
        return "gather/scatter" if re.search(r"index|gather|scatter", fused[2]) else "elementwise/reduction"
    if any(w in low for w in GEMM_WORDS):
        return "GEMM"
    if "sort" in low or "radix" in low:
        return "sort"
    if "memcpy" in low or "memset" in low:
        return "copy/memset"
    return "gather/scatter" if re.search(r"index|gather|scatter", low) else "other"


def kernel_rows(events) -> list[tuple[str, float]]:
    # (name, GPU microseconds) of the profiler's averaged events that are GPU work, as torch's own table totals them:
    # kernels, copies and memsets, not the annotations of user ranges that cover them
    return [(e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and e.self_device_time_total > 0]


def kinds_per_step(rows, steps: int) -> dict[str, float]:
    # rows: (kernel name, GPU microseconds over `steps` steps) -> ms per step of each kind in KINDS, and "total"
    out = dict.fromkeys(KINDS, 0.0)
    for name, us in rows:
        out[kernel_kind(name)] += us / 1000 / steps
    out["total"] = sum(out.values())
    return out


def kind_table(this: dict, against: dict | None = None) -> list[str]:
    # this/against: {"name", "forward+backward" and "optimizers" (kinds_per_step dicts), "timed" (their median ms by
    # CUDA events)} -> the table's lines, with the step's difference this - against per kind where `against` is given
    parts = ("forward+backward", "optimizers")
    runs = [this] + ([against] if against else [])
    head = [f"{run['name']} {p}" for run in runs for p in parts] + (["step difference"] if against else [])
    widths = [max(12, len(h) + 2) for h in head]

    def line(label: str, values: list[list[float]]) -> str:  # values[run][part]
        cells = [v for run in values for v in run] + ([sum(values[0]) - sum(values[1])] if against else [])
        return f"{label:<26}" + "".join(f"{c:>{w}.2f}" for c, w in zip(cells, widths))

    lines = [f"{'kernel kind (ms per step)':<26}" + "".join(f"{h:>{w}}" for h, w in zip(head, widths))]
    lines += [line(kind, [[run[p][kind] for p in parts] for run in runs]) for kind in (*KINDS, "total")]
    # the parts' median times by CUDA events: above the kernel total by the gaps between kernels
    lines.append(line("timed (CUDA events)", [[run["timed"][p] for p in parts] for run in runs]))
    return lines


def load_kinds(path: str) -> dict:
    # a --save file of another run; ValueError names what is wrong with it
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--against {path}: {e}; give a file written by bench/step_profile.py --save") from None
    try:  # the table it goes into reads it now, not after the GPU run
        kind_table(saved)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--against {path}: not a bench/step_profile.py --save file (its name, kernel kinds or "
                         f"times missing or not numbers: {type(e).__name__} {e})") from None
    return saved


def main():
    ap = argparse.ArgumentParser(description="Where a training step's time goes on the GPU: forward+backward, "
                                 "optimizers and Muon, and the top kernels (settings from the environment, as "
                                 "train_gpt.py reads them)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kernels", type=int, default=25, help="rows of the kernel table (0 = no profile)")
    ap.add_argument("--name", help="this run's name in the kind table (default: dense, or e.g. E32top4+1)")
    ap.add_argument("--save", help="write the kernel time by kind to this JSON file, for a later --against")
    ap.add_argument("--against", help="a --save file of another run (e.g. dense) to print beside this one")
    opts = ap.parse_args()
    try:
        args = tg.load_config(dict(os.environ))
        train_files = tg.find_shards(args.train_files, "TRAIN_FILES")
        against = load_kinds(opts.against) if opts.against else None
        if (opts.save or opts.against) and opts.kernels <= 0:
            raise ValueError("--save and --against compare kernel profiles: leave --kernels above 0")
        if opts.steps < 1:  # the medians need one timed step
            raise ValueError(f"--steps {opts.steps}: time at least 1 step")
        if opts.save and not Path(opts.save).resolve().parent.is_dir():
            raise ValueError(f"--save {opts.save}: its folder does not exist; make it or give another path")
        if opts.save and Path(opts.save).is_dir():
            raise ValueError(f"--save {opts.save}: a folder; give the path of a file in it")
    except (tg.ConfigError, tg.DataError, ValueError) as e:
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
        def profiled(fn, steps: int = 3):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
            return kinds_per_step(kernel_rows(prof.key_averages()), steps), prof

        def fwd_bwd_alone():
            fwd_bwd()
            model.zero_grad(set_to_none=True)

        fb, fb_prof = profiled(fwd_bwd_alone)
        fwd_bwd()
        # the optimizers alone: three steps on the same gradients launch what three training steps would
        opt, opt_prof = profiled(lambda: [o.step() for o in optimizers])
        name = opts.name or "dense"
        if args.num_experts and not opts.name:
            name = f"E{args.num_experts}top{args.top_k}" + (f"+{args.shared_experts}" if args.shared_experts else "")
        this = {"name": name, "forward+backward": fb, "optimizers": opt,
                "timed": {"forward+backward": med["forward+backward"], "optimizers": med["optimizers"]}}
        print("GPU kernel time by kind (3 profiled steps each; kinds: bench/step_profile.py's kernel_kind):")
        print("\n".join(kind_table(this, against)))
        if opts.save:
            Path(opts.save).write_text(json.dumps(this, indent=1))
        for part, prof in (("forward+backward", fb_prof), ("optimizers", opt_prof)):
            print(f"top kernels of 3 steps' {part}:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=opts.kernels,
                                            max_name_column_width=90))


if __name__ == "__main__":
    main()
