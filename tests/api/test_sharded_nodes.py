"""Ranks of one server on several machines: torchrun starting each rank, and `--nnodes` / `--node-rank`
across two network namespaces joined by a veth pair (two machines as far as TCP and gloo can tell).

Oracle: the same model on one shard; sharding changes only float32 summation order, so greedy ids are
identical. The failure drills: SIGKILL node 1's process and node 0's server exits non-zero within
LOST_RANK_EXIT_S naming the rank (rank 0 watches ranks it did not start over the network, `liveness`);
SIGKILL node 0's and node 1's process exits as soon, naming rank 0.
The namespace test needs root and `ip netns`; it skips with the reason where they cannot be made.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from .conftest import TEST_SERVER_FLAGS, ServerProcess, free_port, tgserve_env

PROMPT = "The river ran past the mill. The river ran"
NEW_TOKENS = 10
LOST_RANK_EXIT_S = 10.0  # issue 14's bound for a lost rank ending the server
START_S = 240.0


@pytest.fixture(scope="module")
def reference_ids(start_server) -> list[int]:
    """Greedy ids of PROMPT on one shard."""
    return generate_ids(start_server("--num-shard", "1", "--prometheus-port", "0").url)


def generate_ids(url: str) -> list[int]:
    response = httpx.post(f"{url}/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": NEW_TOKENS, "details": True}}, timeout=120)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_torchrun_starts_the_ranks_and_sigterm_stops_them(model_dir, tmp_path, reference_ids):
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tgserve.api.cli", "serve", "--model-id", str(model_dir), *TEST_SERVER_FLAGS,
               "--hostname", "127.0.0.1", "--port", str(port), "--prometheus-port", "0"]
    with open(tmp_path / "torchrun.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=tgserve_env(),
                                   start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, tmp_path / "torchrun.log")
        assert httpx.get(f"http://127.0.0.1:{port}/info", timeout=10).json()["num_shard"] == 2
        assert generate_ids(f"http://127.0.0.1:{port}") == reference_ids
        process.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks: rank 0 drains, rank 1 follows
        process.wait(timeout=60)  # torchrun itself exits 1 after a signal (its SignalException), whatever the ranks did
        log = (tmp_path / "torchrun.log").read_text()
        assert "graceful shutdown after SIGTERM complete" in log and "rank 1: " in log and "steps, stopping" in log
        assert "tgserve: error" not in log and "ChildFailedError" not in log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_torchrun_world_and_num_shard_must_agree(run_cli, model_dir):
    done = run_cli("serve", "--model-id", str(model_dir), "--backend", "cpu", "--num-shard", "4", timeout_s=120,
                   env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == ("tgserve: error: `--num-shard 4` but torchrun started WORLD_SIZE=2 "
                                            "ranks: they must agree (or leave `--num-shard` out)")


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, netns: str | None = None) -> None:
    """Until GET url/health answers 200 (asked from inside `netns` when given)."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if netns is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        elif in_netns(netns, f"import httpx; print(httpx.get('{url}/health', timeout=2).status_code)",
                      check=False).strip() == "200":
            return
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {START_S}s:\n{log_path.read_text()[-3000:]}")


def in_netns(netns: str, code: str, check: bool = True) -> str:
    """Run Python `code` inside network namespace `netns`; its stdout."""
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=150, env=tgserve_env())
    if check:
        assert done.returncode == 0, done.stderr
    return done.stdout


class TwoMachines:
    """Two network namespaces joined by a veth pair: node i has address 10.231.<n>.<i + 1>."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.netns = [f"tgs{tag}n0", f"tgs{tag}n1"]
        self.links = [f"tgv{tag}a", f"tgv{tag}b"]
        subnet = os.getpid() % 250
        self.addresses = [f"10.231.{subnet}.1", f"10.231.{subnet}.2"]
        self._made: list[str] = []

    def make(self) -> None:
        for netns in self.netns:
            run(["ip", "netns", "add", netns])
            self._made.append(netns)
        run(["ip", "link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1]])
        for netns, link, address in zip(self.netns, self.links, self.addresses):
            run(["ip", "link", "set", link, "netns", netns])
            run(["ip", "netns", "exec", netns, "ip", "addr", "add", f"{address}/24", "dev", link])
            run(["ip", "netns", "exec", netns, "ip", "link", "set", link, "up"])
            run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"])

    def remove(self) -> None:
        for netns in self._made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"{' '.join(command)}: {done.stderr.strip()}")


@pytest.mark.parametrize("lost_node", [1, 0], ids=["node-1-lost", "node-0-lost"])
def test_two_machines_serve_one_shards_ids_and_a_lost_node_ends_the_server(lost_node, model_dir, tmp_path,
                                                                         reference_ids):
    """Node 1 lost: node 0's server (rank 0) exits naming rank 1. Node 0 lost: node 1's process, which
    serves no HTTP and would otherwise wait for rank 0's next step forever, exits naming rank 0."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip netns (network namespaces)")
    machines = TwoMachines()
    processes: list[subprocess.Popen] = []
    try:
        try:
            machines.make()
        except OSError as error:
            pytest.skip(f"needs root and ip netns (network namespaces): {error}")
        master, http_port, master_port = machines.addresses[0], free_port(), free_port()
        for node, (netns, link) in enumerate(zip(machines.netns, machines.links)):
            command = ["ip", "netns", "exec", netns, sys.executable, "-m", "tgserve.api.cli", "serve",
                       "--model-id", str(model_dir), *TEST_SERVER_FLAGS, "--prometheus-port", "0",
                       "--num-shard", "2", "--nnodes", "2", "--node-rank", str(node), "--master-addr", master,
                       "--master-port", str(master_port), "--hostname", master, "--port", str(http_port)]
            with open(tmp_path / f"node{node}.log", "wb") as log:  # gloo binds to the veth, not to a hostname
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  env={**tgserve_env(), "GLOO_SOCKET_IFNAME": link},
                                                  start_new_session=True))
        url = f"http://{master}:{http_port}"
        wait_healthy(url, processes[0], tmp_path / "node0.log", netns=machines.netns[0])
        ids = json.loads(in_netns(machines.netns[0], textwrap.dedent(f"""
            import httpx, json
            response = httpx.post("{url}/generate", json={{"inputs": {PROMPT!r}, "parameters": {{
                "max_new_tokens": {NEW_TOKENS}, "details": True}}}}, timeout=120)
            print(json.dumps([t["id"] for t in response.json()["details"]["tokens"]]))""")))
        assert ids == reference_ids
        assert "rank 1 of 2: following rank 0" in (tmp_path / "node1.log").read_text()

        survivor = 1 - lost_node
        processes[lost_node].send_signal(signal.SIGKILL)
        killed_s = time.monotonic()
        try:
            returncode = processes[survivor].wait(timeout=LOST_RANK_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {survivor} still runs {LOST_RANK_EXIT_S}s after node {lost_node} was killed:\n"
                        f"{(tmp_path / f'node{survivor}.log').read_text()[-2000:]}")
        assert returncode == 1 and time.monotonic() - killed_s < LOST_RANK_EXIT_S
        last = (tmp_path / f"node{survivor}.log").read_text().strip().splitlines()[-1]
        if lost_node == 1:
            assert last.startswith("tgserve: error: rank 1 ") and "is gone" in last, last
        else:
            assert last.startswith("tgserve: error: rank 1: the server's rank 0 (or another rank) is gone"), last
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        machines.remove()
