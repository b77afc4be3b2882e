"""benchmarks/spdkpeer.py without SPDK: the target's JSON config and the perf summary parser."""
from benchmarks.spdkpeer import _ROW, BLOCK, NS_BYTES, SUBNQN, target_config

# The tail of a real spdk_nvme_perf (v24.01) run against vnvmed.
SAMPLE = """\
Initialization complete. Launching workers.
========================================================
                                                                           Latency(us)
Device Information                           :       IOPS      MiB/s    Average        min        max
VFIOUSER (/tmp/vnv-spdkc) NSID 1 from core  1:   19274.11      75.29    1665.01      10.67  105335.55
========================================================
Total                                        :   19274.11      75.29    1665.01      10.67  105335.55

"""


def test_summary_row_parsed():
    m = _ROW.search(SAMPLE)
    assert m is not None
    assert [float(m.group(i)) for i in range(1, 6)] == [19274.11, 75.29, 1665.01, 10.67, 105335.55]


def test_target_config_ram_and_null():
    for backend, method in (("ram", "bdev_malloc_create"), ("null", "bdev_null_create")):
        cfg = target_config(backend, "/x/dir")
        bdev = cfg["subsystems"][0]["config"][0]
        assert bdev["method"] == method
        assert bdev["params"]["num_blocks"] * BLOCK == NS_BYTES
        nvmf = {c["method"]: c["params"] for c in cfg["subsystems"][1]["config"]}
        assert nvmf["nvmf_create_transport"]["trtype"] == "VFIOUSER"
        assert nvmf["nvmf_subsystem_add_listener"]["listen_address"]["traddr"] == "/x/dir"
        assert nvmf["nvmf_subsystem_add_ns"]["nqn"] == SUBNQN
