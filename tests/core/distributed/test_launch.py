"""Which ranks each process runs and starts: one machine, `--nnodes` / `--node-rank`, torchrun."""
from __future__ import annotations

import pytest

from tgserve.core.config import ConfigError
from tgserve.core.distributed.launch import RankLaunch, TorchrunRank, plan_launch, read_torchrun


def test_one_machine_rank_0_starts_the_others_and_watches_none_over_the_network():
    launch = plan_launch(4, 1, 0, None)
    assert launch == RankLaunch(world_size=4, first_rank=0, num_local_ranks=4, ranks_per_group=4)
    assert launch.is_serving and list(launch.spawned_ranks) == [1, 2, 3] and launch.watched_ranks == []


def test_each_node_starts_its_share_and_rank_0_watches_their_first_ranks():
    nodes = [plan_launch(6, 3, node, None) for node in range(3)]
    assert [(n.first_rank, list(n.spawned_ranks)) for n in nodes] == [(0, [1]), (2, [3]), (4, [5])]
    assert [n.is_serving for n in nodes] == [True, False, False]
    assert all(n.watched_ranks == [2, 4] for n in nodes)  # every rank joins the same liveness group
    assert nodes[1].local_rank(3) == 1  # the device index on its machine, not the global rank


def test_torchrun_rank_is_one_process_that_starts_nothing():
    launch = plan_launch(None, 1, 0, TorchrunRank(rank=3, world_size=4, local_rank=1))
    assert (launch.first_rank, launch.world_size, list(launch.spawned_ranks)) == (3, 4, [])
    assert not launch.is_serving and launch.watched_ranks == [1, 2, 3] and launch.local_rank(3) == 1
    assert plan_launch(4, 1, 0, TorchrunRank(0, 4, 0)).is_serving


@pytest.mark.parametrize("num_shard, nnodes, node_rank, torchrun, message", [
    (2, 1, 0, TorchrunRank(0, 4, 0), r"`--num-shard 2` but torchrun started WORLD_SIZE=4 ranks"),
    (None, 2, 1, TorchrunRank(0, 4, 0), "`--nnodes` / `--node-rank` are torchrun's flags there"),
    (3, 2, 0, None, r"`--num-shard 3` \(every machine's ranks together\) does not divide over `--nnodes 2`"),
])
def test_contradictions_fail_at_start(num_shard, nnodes, node_rank, torchrun, message):
    with pytest.raises(ConfigError, match=message):
        plan_launch(num_shard, nnodes, node_rank, torchrun)


def test_torchrun_variables():
    assert read_torchrun({"PATH": "/bin"}) is None
    assert read_torchrun({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == TorchrunRank(1, 2, 1)
    with pytest.raises(ConfigError, match="not LOCAL_RANK"):
        read_torchrun({"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        read_torchrun({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="are not integers"):
        read_torchrun({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
