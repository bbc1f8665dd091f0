"""`pagedserve serve --replicas N` placement: one GPU per replica, or disjoint CPU sets."""
from services.replica_placement import replica_placements


def test_cpu_replicas_get_disjoint_core_sets():
    p = replica_placements(2, "cpu", cpus=[0, 1, 2, 3, 4])
    assert [sorted(x.cpus) for x in p] == [[0, 1], [2, 3]]
    assert [x.env["OMP_NUM_THREADS"] for x in p] == ["2", "2"]
    assert all(x.cpus is None and not x.env for x in replica_placements(3, "cpu", cpus=[0, 1]))  # too few: shared
    assert replica_placements(1, "cpu", cpus=[0, 1])[0].cpus is None


def test_gpu_replicas_get_one_device_each():
    p = replica_placements(3, "cuda", gpus=["0", "1"])
    assert [x.env["CUDA_VISIBLE_DEVICES"] for x in p] == ["0", "1", "0"]
    assert all(x.cpus is None for x in p)
    assert [x.env.get("CUDA_VISIBLE_DEVICES") for x in replica_placements(2, "auto", cpus=[0, 1], gpus=[])] == \
        [None, None]
    assert replica_placements(2, "auto", cpus=[0, 1], gpus=[])[1].cpus == frozenset({1})


def test_cpus_per_replica_pins_even_one_replica():
    import pytest

    (one,) = replica_placements(1, "cpu", cpus=[0, 1, 2, 3], cpus_per_replica=1)
    assert one.cpus == frozenset({0}) and one.env["OMP_NUM_THREADS"] == "1"
    assert [sorted(p.cpus) for p in replica_placements(2, "cpu", cpus=[0, 1, 2, 3], cpus_per_replica=1)] == [[0], [1]]
    with pytest.raises(ValueError, match="needs 6 CPUs"):
        replica_placements(3, "cpu", cpus=[0, 1, 2, 3], cpus_per_replica=2)
