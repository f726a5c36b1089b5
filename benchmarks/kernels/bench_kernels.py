"""Benchmark the FlexDraft Triton kernels on a CUDA GPU (triton.testing.do_bench).

  python benchmarks/kernels/bench_kernels.py            # full sweep (a few minutes on an H100)
  python benchmarks/kernels/bench_kernels.py --quick    # a handful of shapes

Mask attention (flexdraft_kernels.mask_attention over vLLM 0.32's paged "flash"
KV-cache layout, one block of B masks per request, bf16):
  kernel          the Triton kernel, split-K heuristic (what the proposer calls)
  kernel_s1       the Triton kernel with num_splits=1
  torch_ref       mask_attention_ref: gather the pages + fp32 einsum softmax
  sdpa_flash      torch SDPA (FlashAttention backend) on K/V already gathered into a
                  contiguous [N, Hkv, ctx + B, D] tensor: the gather is NOT timed, so this is
                  the best a dense kernel can do on the same math
  sdpa_gather     the page gather + sdpa_flash (what torch alone would cost)
  Achieved bandwidth = bytes that must be read or written (context K/V + the block's
  q/k/v + out) / time, also as a fraction of the card's peak (table below).
Calibrated rejection sampling (flexdraft_kernels.rejection_sampler, K drafts, fp32 logits):
  kernel / torch_ref for rejection_sample (random and greedy) and calibrated_drafts.
  Bandwidth counts the logits (+ noise) read once; the launcher's fp32 softmax is included
  in the kernel time.

Writes results/bench_kernels_<device>.json and .png beside this file (or --out).
Needs CUDA: without it the script exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

# HBM peak bandwidth, bytes/s, by torch.cuda.get_device_name() pattern (first match wins)
PEAK_BANDWIDTH = [
    (r"GH200", 4.0e12),
    (r"H200", 4.8e12),
    (r"H100.*NVL", 3.9e12),
    (r"H100.*PCIe", 2.0e12),
    (r"H100", 3.35e12),  # SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    (r"B200", 8.0e12),
    (r"A100.*80GB.*PCIe|A100-PCIE-80GB", 1.935e12),
    (r"A100-SXM4-80GB|A100.*SXM.*80", 2.039e12),
    (r"A100", 1.555e12),
    (r"L40S", 0.864e12),
    (r"L40", 0.864e12),
    (r"L4\b", 0.3e12),
    (r"A10G", 0.6e12),
    (r"A10\b", 0.6e12),
    (r"RTX 4090", 1.008e12),
    (r"RTX 3090", 0.936e12),
]

MODELS = {  # name: (Hq, Hkv, D)
    "smollm2-135m": (9, 3, 64),
    "llama-8b": (32, 8, 128),
}


def peak_for(name: str) -> float | None:
    for pat, bw in PEAK_BANDWIDTH:
        if re.search(pat, name):
            return bw
    return None


def bench(fn, warmup=25, rep=100) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))  # ms


# ---- mask attention ----------------------------------------------------------------------------
def attention_case(model, N, ctx, B, page, dtype, dev):
    from flexdraft_kernels.mask_attention import paged_kv_views

    Hq, Hkv, D = MODELS[model]
    pages_per_req = math.ceil(ctx / page)
    num_pages = N * pages_per_req + 8
    # vLLM 0.32 flash layout: logical [pages, Hkv, page, 2D], NHD physical order
    nhd = torch.randn(num_pages, page, Hkv, 2 * D, device=dev, dtype=dtype)
    kv_cache = nhd.transpose(1, 2)
    key_cache, value_cache = paged_kv_views(kv_cache, D, "flash")
    block_table = torch.randperm(num_pages, device=dev)[: N * pages_per_req].view(N, pages_per_req).int()
    q = torch.randn(N * B, Hq, D, device=dev, dtype=dtype)
    kb = torch.randn(N * B, Hkv, D, device=dev, dtype=dtype)
    vb = torch.randn(N * B, Hkv, D, device=dev, dtype=dtype)
    blk_req = torch.arange(N, device=dev)
    blk_ctx = torch.full((N,), ctx, device=dev)
    return dict(q=q, k_blk=kb, v_blk=vb, key_cache=key_cache, value_cache=value_cache, block_table=block_table,
                blk_req=blk_req, blk_ctx=blk_ctx, scale=1.0 / math.sqrt(D), block_size=B)


def gather_dense(c, N, ctx, B):
    """[N, Hkv, ctx + B, D] contiguous K and V: each request's pages, then its block."""
    kc, vc, bt = c["key_cache"], c["value_cache"], c["block_table"]
    page = kc.shape[1]
    P = bt.shape[1]
    k = kc[bt.long()].reshape(N, P * page, *kc.shape[2:])[:, :ctx]
    v = vc[bt.long()].reshape(N, P * page, *vc.shape[2:])[:, :ctx]
    k = torch.cat([k, c["k_blk"].view(N, B, *kc.shape[2:])], 1).transpose(1, 2).contiguous()
    v = torch.cat([v, c["v_blk"].view(N, B, *vc.shape[2:])], 1).transpose(1, 2).contiguous()
    return k, v


def sdpa_fn(q4, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Hq, Hkv = q4.shape[1], k.shape[1]

    def run(k=k, v=v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            try:
                return torch.nn.functional.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
            except (RuntimeError, TypeError):  # no GQA in this backend / torch: expand the heads
                rep = Hq // Hkv
                return torch.nn.functional.scaled_dot_product_attention(
                    q4, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), scale=scale)

    return run


def bench_attention(args, dev, peak, log):
    from flexdraft_kernels.mask_attention import mask_attention, mask_attention_ref

    rows = []
    B, page, dtype = args.block_size, 16, torch.bfloat16
    batches = [1, 4, 16, 64] if not args.quick else [1, 16]
    ctxs = [512, 2048, 8192] if not args.quick else [512, 4096]
    for model in MODELS:
        Hq, Hkv, D = MODELS[model]
        for N in batches:
            for ctx in ctxs:
                c = attention_case(model, N, ctx, B, page, dtype, dev)
                esz = torch.finfo(dtype).bits // 8
                kv_bytes = 2 * N * ctx * Hkv * D * esz
                io_bytes = kv_bytes + esz * N * B * D * (2 * Hq + 2 * Hkv)
                args_ = [c[k] for k in ("q", "k_blk", "v_blk", "key_cache", "value_cache", "block_table",
                                        "blk_req", "blk_ctx", "scale", "block_size")]
                out = mask_attention(*args_, max_ctx_len=ctx)
                ref = mask_attention_ref(*args_)
                err = float((out.float() - ref.float()).abs().max())
                k, v = gather_dense(c, N, ctx, B)
                q4 = c["q"].view(N, B, Hq, D).transpose(1, 2)
                sdpa = sdpa_fn(q4, k, v, c["scale"])
                sd = sdpa().transpose(1, 2).reshape(N * B, Hq, D)
                err_sdpa = float((sd.float() - ref.float()).abs().max())
                t = {
                    "kernel": bench(lambda: mask_attention(*args_, max_ctx_len=ctx)),
                    "kernel_s1": bench(lambda: mask_attention(*args_, num_splits=1)),
                    "sdpa_flash": bench(sdpa),
                    "sdpa_gather": bench(lambda: sdpa(*gather_dense(c, N, ctx, B))),
                }
                if not (args.quick and ctx * N > 16384):
                    t["torch_ref"] = bench(lambda: mask_attention_ref(*args_), warmup=3, rep=20)
                row = dict(model=model, Hq=Hq, Hkv=Hkv, D=D, N=N, ctx=ctx, B=B, page=page, dtype=str(dtype),
                           bytes=io_bytes, kv_bytes=kv_bytes, ms=t, max_abs_err_vs_ref=err,
                           sdpa_max_abs_err_vs_ref=err_sdpa)
                row["gbps"] = {m: io_bytes / (ms * 1e-3) / 1e9 for m, ms in t.items()}
                if peak:
                    row["frac_peak"] = {m: g * 1e9 / peak for m, g in row["gbps"].items()}
                rows.append(row)
                log(f"attn {model:13s} N={N:3d} ctx={ctx:5d}  " + "  ".join(
                    f"{m}={ms * 1e3:8.1f}us" for m, ms in t.items())
                    + (f"  kernel {row['frac_peak']['kernel'] * 100:5.1f}% of peak" if peak else "")
                    + f"  err={err:.2e}")
                del c, k, v
                torch.cuda.empty_cache()
    return rows


# ---- rejection sampling ------------------------------------------------------------------------
def bench_sampler(args, dev, peak, log):
    from flexdraft_kernels import rejection_sampler as RS

    rows = []
    K = args.block_size - 1
    vocabs = [49152, 128256, 151936] if not args.quick else [49152, 151936]
    batches = [1, 8, 64] if not args.quick else [1, 64]
    for V in vocabs:
        for N in batches:
            g = torch.Generator(device=dev).manual_seed(0)
            logits = torch.randn(N, K + 1, V, device=dev, generator=g) * 3
            draft_ids = logits[:, :K].argmax(-1)
            flip = torch.rand(N, K, device=dev, generator=g) < 0.3
            draft_ids = torch.where(flip, (draft_ids + 1) % V, draft_ids)
            num_drafts = torch.full((N,), K, device=dev)
            uniforms, noise = RS.generate_random_inputs(N, K, V, device=dev)
            for mode in ("random", "greedy"):
                temp = torch.full((N,), 1.0 if mode == "random" else 0.0, device=dev)
                a = (logits, draft_ids, num_drafts, None, temp, uniforms, noise)
                got = RS.rejection_sample(*a, all_greedy=mode == "greedy")
                ref = RS.rejection_sample_ref(*a)
                same = bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
                t = {"kernel": bench(lambda: RS.rejection_sample(*a, all_greedy=mode == "greedy"))}
                t["torch_ref"] = bench(lambda: RS.rejection_sample_ref(*a), warmup=2, rep=10)
                nbytes = logits.numel() * 4 + (N * V * 4 if mode == "random" else 0)
                row = dict(op="rejection_sample", mode=mode, V=V, N=N, K=K, ms=t, bytes=nbytes,
                           equal_to_reference=same)
                row["gbps"] = {m: nbytes / (ms * 1e-3) / 1e9 for m, ms in t.items()}
                if peak:
                    row["frac_peak"] = {m: gb * 1e9 / peak for m, gb in row["gbps"].items()}
                rows.append(row)
                log(f"rej  {mode:6s} V={V:6d} N={N:3d}  kernel={t['kernel'] * 1e3:8.1f}us  "
                    f"ref={t['torch_ref'] * 1e3:9.1f}us  equal={same}")
            dl = logits[:, :K].contiguous()
            got = RS.calibrated_drafts(dl, None, "cumprod", 0.01, 0.3, K)
            ref = RS.calibrated_drafts_ref(dl, None, "cumprod", 0.01, 0.3, K)
            same = bool(torch.equal(got.argmax_ids, ref.argmax_ids))
            t = {"kernel": bench(lambda: RS.calibrated_drafts(dl, None, "cumprod", 0.01, 0.3, K)),
                 "torch_ref": bench(lambda: RS.calibrated_drafts_ref(dl, None, "cumprod", 0.01, 0.3, K))}
            nbytes = dl.numel() * 4
            row = dict(op="calibrated_drafts", V=V, N=N, K=K, ms=t, bytes=nbytes, argmax_equal_to_reference=same)
            row["gbps"] = {m: nbytes / (ms * 1e-3) / 1e9 for m, ms in t.items()}
            if peak:
                row["frac_peak"] = {m: gb * 1e9 / peak for m, gb in row["gbps"].items()}
            rows.append(row)
            log(f"cal         V={V:6d} N={N:3d}  kernel={t['kernel'] * 1e3:8.1f}us  "
                f"ref={t['torch_ref'] * 1e3:9.1f}us  argmax equal={same}")
    return rows


# ---- plots -------------------------------------------------------------------------------------
def plot(result, path: Path, log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
        return
    attn, samp = result["attention"], result["sampler"]
    models = list(MODELS) if attn else []
    ncols = max(1, len(models)) + (1 if samp else 0)
    fig, axes = plt.subplots(2, ncols, figsize=(6 * ncols, 9), squeeze=False)
    for j, model in enumerate(models):
        rows = [r for r in attn if r["model"] == model]
        ax, axb = axes[0][j], axes[1][j]
        for N in sorted({r["N"] for r in rows}):
            rs = sorted((r for r in rows if r["N"] == N), key=lambda r: r["ctx"])
            x = [r["ctx"] for r in rs]
            line = ax.plot(x, [r["ms"]["kernel"] * 1e3 for r in rs], "o-", label=f"kernel N={N}")[0]
            ax.plot(x, [r["ms"]["sdpa_flash"] * 1e3 for r in rs], "s--", color=line.get_color(),
                    label=f"SDPA flash (pre-gathered) N={N}")
            ax.plot(x, [r["ms"]["sdpa_gather"] * 1e3 for r in rs], ":", color=line.get_color(), alpha=0.6)
            key = "frac_peak" if result["peak_bytes_per_s"] else "gbps"
            scale = 100 if key == "frac_peak" else 1
            axb.plot(x, [r[key]["kernel"] * scale for r in rs], "o-", color=line.get_color(), label=f"kernel N={N}")
            axb.plot(x, [r[key]["sdpa_flash"] * scale for r in rs], "s--", color=line.get_color(), alpha=0.7)
        Hq, Hkv, D = MODELS[model]
        ax.set(xscale="log", yscale="log", xlabel="context", ylabel="us",
               title=f"mask attention {model} (Hq={Hq}, Hkv={Hkv}, D={D}, B={result['block_size']})")
        ax.legend(fontsize=7)
        axb.set(xscale="log", xlabel="context",
                ylabel="% of peak HBM bandwidth" if result["peak_bytes_per_s"] else "GB/s",
                title="achieved bandwidth (solid: kernel, dashed: SDPA flash)")
    if samp:
        ax, axb = axes[0][-1], axes[1][-1]
        for V in sorted({r["V"] for r in samp}):
            for op, mode, style in (("rejection_sample", "random", "o-"), ("rejection_sample", "greedy", "^-"),
                                    ("calibrated_drafts", None, "s-")):
                rs = sorted((r for r in samp if r["V"] == V and r["op"] == op and r.get("mode") == mode),
                            key=lambda r: r["N"])
                if not rs:
                    continue
                lab = f"{op}{'/' + mode if mode else ''} V={V}"
                line = ax.plot([r["N"] for r in rs], [r["ms"]["kernel"] * 1e3 for r in rs], style, label=lab)[0]
                axb.plot([r["N"] for r in rs], [r["ms"]["torch_ref"] / r["ms"]["kernel"] for r in rs], style,
                         color=line.get_color(), label=lab)
        ax.set(xscale="log", yscale="log", xlabel="requests N", ylabel="us (kernel)",
               title=f"calibrated rejection sampling (K={result['block_size'] - 1})")
        ax.legend(fontsize=6)
        axb.set(xscale="log", yscale="log", xlabel="requests N", ylabel="speed-up vs torch reference")
    fig.suptitle(f"FlexDraft kernels on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--only", choices=["attention", "sampler"], help="run one benchmark")
    ap.add_argument("--block-size", type=int, default=8, help="masks per block B (drafts K = B - 1)")
    ap.add_argument("--peak-gbps", type=float, help="HBM peak of this card, GB/s (default: from the table)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device (torch.cuda.is_available() is False). These are GPU kernel "
              "benchmarks; run them on a CUDA machine. Nothing was measured or written.", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = args.peak_gbps * 1e9 if args.peak_gbps else peak_for(name)

    def log(msg):
        print(msg, flush=True)

    log(f"device: {name}; peak HBM bandwidth: {peak / 1e12:.2f} TB/s" if peak else
        f"device: {name}; peak bandwidth unknown (pass --peak-gbps for fractions of peak)")
    t0 = time.time()
    result = dict(
        device=name, peak_bytes_per_s=peak, block_size=args.block_size, quick=args.quick,
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"), method="triton.testing.do_bench, median ms",
        attention=[], sampler=[],
    )
    if args.only in (None, "attention"):
        result["attention"] = bench_attention(args, dev, peak, log)
    if args.only in (None, "sampler"):
        result["sampler"] = bench_sampler(args, dev, peak, log)
    result["seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ("-quick" if args.quick else "")
    jpath = args.out / f"bench_kernels_{slug}.json"
    jpath.write_text(json.dumps(result, indent=1))
    log(f"wrote {jpath}")
    plot(result, args.out / f"bench_kernels_{slug}.png", log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
