"""Each cost formula pinned to a hand calculation (peers.md §6)."""

from __future__ import annotations

import numpy as np
import pytest

from cost_models import collectives as c
from cost_models.cluster import resolve_cluster
from cost_models.compute import op_time
from planner.errors import UserError

ALPHA, BW = 1e-5, 100e9


@pytest.mark.parametrize("p", [2, 4, 8])
def test_ring_formulas(p):
    n = 1 << 26
    link = c.flat_link(p, ALPHA, BW)
    assert c.all_reduce(n, link) == pytest.approx(2 * (p - 1) * ALPHA + 2 * (p - 1) / p * n / BW)
    assert c.all_gather(n, link) == pytest.approx((p - 1) * ALPHA + (p - 1) / p * n / BW)
    assert c.reduce_scatter(n, link) == pytest.approx((p - 1) * ALPHA + (p - 1) / p * n / BW)
    assert c.all_to_all(n, link) == pytest.approx((p - 1) * ALPHA + (p - 1) / p * n / BW)
    assert c.send_recv(n, ALPHA, BW) == pytest.approx(ALPHA + n / BW)
    assert c.broadcast(n, link) == pytest.approx(np.log2(p) * ALPHA + n / BW)


def test_dispatch_is_paid_once_per_call_and_not_by_buckets():
    from planner.mesh import mesh_from_links
    from planner.sharding import bucketed_collective_seconds

    d, n = 7e-6, 1 << 20
    plain, charged = c.flat_link(4, ALPHA, BW), c.flat_link(4, ALPHA, BW, d)
    for kind, fn in c.COLLECTIVES.items():
        assert fn(n, charged) == pytest.approx(fn(n, plain) + d), kind
    assert c.send_recv(n, ALPHA, BW, d) == pytest.approx(c.send_recv(n, ALPHA, BW) + d)
    assert c.all_reduce(0, charged) == 0 and c.all_reduce(n, c.flat_link(1, ALPHA, BW, d)) == 0
    # a bucketed gradient all-reduce pays alpha and dispatch in proportion to its share
    bucketed = [
        bucketed_collective_seconds("all_reduce", [0], n, mesh_from_links((4,), [link]))
        for link in (plain, charged)
    ]
    assert bucketed[1] - bucketed[0] == pytest.approx(d * n / (25 * 2**20))
    mesh = mesh_from_links((2, 2), [c.flat_link(2, ALPHA, BW, d)] * 2)
    assert mesh.flattened().links[0].dispatch == d


def test_single_rank_is_free():
    link = c.flat_link(1, ALPHA, BW)
    assert c.all_reduce(1e9, link) == 0 and c.all_gather(1e9, link) == 0


def test_axis_links_on_two_p3_hosts():
    cluster = resolve_cluster("p3.16xlarge:2")
    ids = np.arange(16).reshape(2, 8)
    across, inside = c.axis_link(cluster, ids, 0), c.axis_link(cluster, ids, 1)
    assert (across.size, across.hosts, across.per_host) == (2, 2, 1)
    assert (inside.size, inside.hosts) == (8, 1)
    # 8 ranks of each host cross hosts at once and share the host's 25 Gbit/s.
    assert across.inter_bw == pytest.approx(3.125e9 / 8)
    n = 1 << 28
    assert c.all_reduce(n, across) == pytest.approx(
        2 * (2 - 1) * 30e-6 + 2 * (1 / 2) * n / (3.125e9 / 8)
    )


def test_hierarchical_all_reduce_of_a_flat_16_rank_axis():
    """RS inside each host, AR of n/g across hosts, AG inside: peers.md §6.2."""
    cluster = resolve_cluster("dgx-a100:2")
    link = c.axis_link(cluster, np.arange(16).reshape(1, 16), 1)
    n, g, k = 1 << 30, 8, 2
    intra = 2 * (g - 1) * 8e-6 + 2 * (g - 1) / g * n / 240e9
    inter = 2 * (k - 1) * 10e-6 + 2 * (k - 1) / k * (n / g) / 200e9
    assert c.all_reduce(n, link) == pytest.approx(intra + inter)


def test_roofline():
    dev = resolve_cluster("dgx-a100").device
    flops, nbytes = 2 * 4096**3, 3 * 4096 * 4096 * 2
    expected = max(flops / (312e12 * 0.6), nbytes / (2.0e12 * 0.7)) + 5e-6
    assert op_time(flops, nbytes, dev, "float16") == pytest.approx(expected)
    # elementwise: memory bound
    assert op_time(1e6, 8e6, dev) == pytest.approx(8e6 / (2.0e12 * 0.7) + 5e-6)


def test_cluster_presets_and_counts():
    assert resolve_cluster("p3.16xlarge:8").num_devices == 64
    cpu = resolve_cluster("cpu:4")
    assert (cpu.hosts, cpu.devices_per_host) == (1, 4)
    cpu = resolve_cluster("cpu:2x2")
    assert (cpu.hosts, cpu.devices_per_host) == (2, 2) and cpu.host_of(3) == 1
    assert resolve_cluster("dgx-h100:2").device.memory_bytes == 80 * 2**30


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [("tpu-v4:8", "unknown cluster"), ("p3.16xlarge:x", "bad cluster count")],
)
def test_bad_cluster_names(spec, pattern):
    with pytest.raises(UserError, match=pattern):
        resolve_cluster(spec)


def test_bad_yaml_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: x\nhosts: 2\ndevices_per_host: 8\n"
        "device: {name: d, peak_flops: {float32: 1e12}, memory_bytes: -5, memory_bandwidth: 1e9}\n"
        "intra_host: {bandwidth: 1e9, latency: 0}\ninter_host: {bandwidth: 1e9, latency: 0}\n"
    )
    with pytest.raises(UserError, match=r"field 'device.memory_bytes'"):
        resolve_cluster(str(path))
    path.write_text("hosts: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve_cluster(str(path))


def test_example_cluster_files_load():
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "examples" / "clusters").glob("*.yaml"):
        assert resolve_cluster(str(path)).num_devices >= 2
