"""Peak extra CPU memory of forward + backward: materialising vs chunked InfoNCE (CLIP) and SigLIP losses.

Every measurement runs in a fresh ``spawn`` subprocess (the parent never imports torch): the child allocates
the inputs (unit features ``[B, d]`` with ``requires_grad``), runs a tiny warm-up so lazily loaded kernels
do not count, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``, when allowed), reads
``ru_maxrss`` as the baseline, runs one forward + backward, and reports ``ru_maxrss - baseline``. The
figure therefore includes the feature gradients (``2 B d`` floats) and every temporary of the loss.

A naive run whose predicted need exceeds ``--max-naive-gib`` is not run; the prediction is reported
instead, marked ``predicted``. The prediction is ``bytes-per-logit x B^2``, with ``bytes-per-logit``
calibrated on the largest measured naive run of the same loss (a default before any is measured).

    python benchmarks/bench_loss_memory.py --batches 1024 4096 16384 65536 --dim 512 --chunk 4096
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
from pathlib import Path

GIB = 1024**3
# Before any naive run is measured: the plain losses keep about 4-6 float32 [B, B] matrices alive at peak.
DEFAULT_BYTES_PER_LOGIT = {"infonce": 6 * 4, "siglip": 6 * 4}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the RSS high-water mark so ``ru_maxrss`` restarts from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _losses():  # noqa: ANN202 -- imported in the child only
    import torch
    import torch.nn.functional as F

    from counterpoint.objectives.chunked import chunked_infonce_loss, chunked_siglip_loss
    from counterpoint.objectives.contrastive import infonce_loss

    def siglip_naive(u, v, logit_scale, logit_bias):  # noqa: ANN001, ANN202
        """The usual materialising SigLIP (labels 2I - 1, logsigmoid over the whole matrix)."""
        logits = logit_scale.exp() * u @ v.T + logit_bias
        labels = 2 * torch.eye(u.shape[0], dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / u.shape[0]

    return {
        ("infonce", "naive"): lambda u, v, s, b, chunk: infonce_loss(u, v, u, v, s),
        ("infonce", "chunked"): lambda u, v, s, b, chunk: chunked_infonce_loss(u, v, u, v, s, 0, chunk),
        ("siglip", "naive"): lambda u, v, s, b, chunk: siglip_naive(u, v, s, b),
        ("siglip", "chunked"): lambda u, v, s, b, chunk: chunked_siglip_loss(u, v, s, b, 0, chunk),
    }


def _child(job: dict, queue: mp.Queue) -> None:
    import math
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(job["threads"])
    fn = _losses()[(job["loss"], job["impl"])]

    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        u = F.normalize(torch.randn(b, job["dim"], generator=g), dim=-1).requires_grad_()
        v = F.normalize(torch.randn(b, job["dim"], generator=g), dim=-1).requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        return u, v, s, bias

    warm = inputs(64)
    fn(*warm, 16).backward()
    del warm
    u, v, s, bias = inputs(job["batch"])
    reset = _reset_peak()
    base = _maxrss_bytes()
    rss = _current_rss_bytes()
    t0 = time.perf_counter()
    loss = fn(u, v, s, bias, job["chunk"])
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    queue.put({**job, "extra_bytes": peak - base, "baseline_bytes": base, "baseline_rss_bytes": rss,
               "peak_reset": reset, "seconds": seconds, "loss_value": float(loss.detach()),
               "status": "measured"})


def measure(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    proc.join()
    try:
        return queue.get(timeout=10)
    except Exception:  # noqa: BLE001 -- nothing came back: killed (e.g. out of memory) or crashed
        return {**job, "status": f"failed (exit code {proc.exitcode})"}


def predicted(job: dict, bytes_per_logit: float) -> dict:
    return {**job, "status": "predicted", "extra_bytes": int(bytes_per_logit * job["batch"] ** 2),
            "bytes_per_logit": bytes_per_logit}


def fmt_gib(rec: dict | None) -> str:
    if rec is None:
        return "-"
    if "extra_bytes" not in rec:
        return rec["status"]
    gib = rec["extra_bytes"] / GIB
    text = f"{gib:.3f}" if gib < 1 else f"{gib:.2f}"
    if rec["status"] == "predicted":
        return f"~{text} (predicted)"
    return f"{text} ({rec['seconds']:.1f} s)"


def table(records: list[dict]) -> str:
    by = {(r["batch"], r["loss"], r["impl"]): r for r in records}
    batches = sorted({r["batch"] for r in records})
    cols = [("infonce", "naive"), ("infonce", "chunked"), ("siglip", "naive"), ("siglip", "chunked")]
    lines = ["| B | " + " | ".join(f"{loss} {impl} GiB (time)" for loss, impl in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(fmt_gib(by.get((b, *c))) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--losses", nargs="+", default=["infonce", "siglip"], choices=["infonce", "siglip"])
    ap.add_argument("--impls", nargs="+", default=["naive", "chunked"], choices=["naive", "chunked"])
    ap.add_argument("--max-naive-gib", type=float, default=8.0,
                    help="do not run a naive loss predicted to need more than this; report the prediction")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads in each child")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_memory.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the records already in --out (other batch sizes) and replace only those rerun")
    args = ap.parse_args(argv)

    old: list[dict] = []
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())["records"]
    records: list[dict] = []
    for b in sorted(args.batches):
        for loss in args.losses:
            for impl in args.impls:
                job = {"batch": b, "dim": args.dim, "chunk": args.chunk, "loss": loss, "impl": impl,
                       "threads": args.threads}
                if impl == "naive":
                    measured = [r for r in old + records if r["loss"] == loss and r["impl"] == "naive"
                                and r["status"] == "measured" and r["dim"] == args.dim]
                    if measured:
                        ref = max(measured, key=lambda r: r["batch"])
                        bpl = ref["extra_bytes"] / ref["batch"] ** 2
                    else:
                        bpl = DEFAULT_BYTES_PER_LOGIT[loss]
                    if bpl * b * b > args.max_naive_gib * GIB:
                        rec = predicted(job, bpl)
                        print(f"B={b} {loss} naive: predicted {rec['extra_bytes'] / GIB:.2f} GiB, not run",
                              flush=True)
                        records.append(rec)
                        continue
                rec = measure(job)
                print(f"B={b} {loss} {impl}: {fmt_gib(rec)}", flush=True)
                records.append(rec)

    keys = {(r["batch"], r["loss"], r["impl"]) for r in records}
    records = [r for r in old if (r["batch"], r["loss"], r["impl"]) not in keys] + records
    records.sort(key=lambda r: (r["batch"], r["loss"], r["impl"]))
    md = table(records)
    print()
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "unit": "bytes of peak RSS above the baseline after allocating the inputs (forward + backward)"}
    args.out.write_text(json.dumps({"meta": meta, "records": records, "table_markdown": md}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
