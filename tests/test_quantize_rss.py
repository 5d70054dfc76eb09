"""Quantizing streams as the OS sees it: the peak resident memory of a fresh process (VmHWM: ru_maxrss without
what Linux carries over from the parent; what a cgroup charges) above its import baseline stays under 40% of a multi-shard checkpoint whose shards are several times larger
than its largest tensor. The measurement is evals/bench_quantize_rss.py's (which runs the 1.6 GB case)."""

from conftest import load_eval

# hidden 512, experts of 1536, vocab 2000, 12 layers: 1.5 MB expert matrices, 8 shards of ~60 MB, 473 MB in all.
# Measured 28-29% (the bound's terms are 19%; the rest is code pages and allocator state touched on first use,
# ~25 MB whatever the size, and glibc's freed heap). At 6 layers (239 MB) that fixed part alone is ~10% of the
# checkpoint and a loaded CI machine measured 40.2% once.
SHAPE = dict(vocab_size=2000, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2)


def test_peak_rss_of_quantizing_stays_under_40_percent_of_the_checkpoint(tmp_path):
    bench = load_eval("bench_quantize_rss")
    res = bench.run(layers=12, shards=8, tmp=str(tmp_path), shape=SHAPE)
    ck, m = res["checkpoint"], res["runs"]["new"]
    print(res)
    assert ck["shards"] == 8 and ck["largest_shard"] >= 10 * ck["largest_tensor"]  # the case the bound is about
    assert m["output_bytes"] > 0 and m["peak_rss"] > m["baseline_rss"]  # a real peak, not a parent's high-water
    assert m["above_baseline"] < 0.4 * ck["bytes"], (
        f"peak RSS {m['above_baseline'] / 1e6:.1f} MB above the baseline, {100 * m['fraction_of_checkpoint']:.0f}% "
        f"of the {ck['bytes'] / 1e6:.1f} MB checkpoint (bound: largest shard + output shard + largest tensor = "
        f"{res['bound_bytes'] / 1e6:.1f} MB)"
    )
