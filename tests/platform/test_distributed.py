import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist

from nestune.platform.data import load_data
from nestune.platform.distributed import TorchReplicas, _train_member_replicated
from nestune.platform.training import train_member
from nestune.search_spaces.darts import DartsSpace, Genotype

SPACE = DartsSpace()
SEARCH_JOB = {"kind": "search", "method": "darts", "seed": 4, "epochs": 1, "C": 4, "layers": 3,
              "batch_size": 32}
DATA = {"name": "digits", "subset": 160}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Logical CPUs: the trial's sliver plus one per Train worker; the processes themselves use
    # one thread each.
    # address="local": a new instance even where another Ray runs on this machine (or
    # RAY_ADDRESS is set); ray.init() alone would attach to that one and refuse num_cpus.
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_data_parallel_darts_search_in_a_tune_trial(ray_local, tmp_path):
    from ray import tune

    from nestune.platform.distributed import run_job_distributed

    out = tmp_path / "result.json"

    def trainable(config):
        torch.set_num_threads(1)
        result = run_job_distributed(config["job"], DATA, workers=2, use_gpu=False,
                                     report_defaults={"val_nll": float("nan")})
        np.savez(str(out) + ".npz", **result.pop("arrays"))
        out.write_text(json.dumps(result))
        tune.report({"val_nll": float("nan"), "device_seconds": result["device_seconds"]})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}),
        param_space={"job": SEARCH_JOB},
        tune_config=tune.TuneConfig(metric="val_nll", mode="min", num_samples=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="dp", verbose=0),
    )
    trial = tuner.fit()[0]
    assert trial.error is None
    # The workers' per-epoch report reached the trial through TuneReportCallback.
    reported = trial.metrics_dataframe
    assert "epoch" in reported and (reported["epoch"] == 1).any()
    assert (reported["workers"].dropna() == 2).all()

    # The same contract as the single-process search job.
    result = json.loads(out.read_text())
    assert result["kind"] == "search" and result["method"] == "darts"
    SPACE.validate(Genotype.from_json(result["genotype"]))
    assert result["device_seconds"] > 0
    extra = result["extra"]
    assert extra["workers"] == 2 and extra["per_worker_batch_size"] == 16
    assert len(extra["history"]["weights"]) == 2
    assert np.array(extra["history"]["weights"][-1]["normal"]).shape == (14, 8)
    # Every worker ended with the same architecture: the update ran identically on each.
    assert extra["replica_max_deviation"] == 0.0
    with np.load(str(out) + ".npz") as arrays:
        assert arrays["alpha_normal"].shape == (14, 8)
        assert np.isfinite(arrays["alpha_reduce"]).all()


@pytest.fixture
def gloo_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
@pytest.mark.ray
def test_data_parallel_member_job_stores_its_shifted_predictions(ray_local, tmp_path):
    """A member job on 2 workers with the study's shift options: rank 0 predicts the corrupted
    copies with the trained network and they come back with the member."""
    from nestune.platform.distributed import run_job_distributed
    from nestune.platform.shift import shift_options

    torch.set_num_threads(1)
    genotype = SPACE.sample(np.random.default_rng(5))
    job = {"kind": "member", "genotype": genotype.to_json(), "seed": 2, "epochs": 1, "C": 4,
           "layers": 3, "batch_size": 32}
    shift = shift_options({"corruptions": ["contrast"], "severities": [2, 4], "subset": 20})
    result = run_job_distributed(job, DATA, workers=2, use_gpu=False,
                                 storage_path=str(tmp_path / "train"), shift=shift)
    assert result["member"].val_probs.shape[1] == 10
    for split, n in (("test", 20), ("val", 20)):
        probs = result["shifted"][split]
        assert sorted(probs) == [("contrast", 2), ("contrast", 4)]
        assert all(p.shape == (n, 10) and p.dtype == np.float16 for p in probs.values())


def test_replicated_member_training_matches_train_member(gloo_group):
    """With one worker the data-parallel recipe (DDP, sharded batches, all-reduced losses) is
    train_member's recipe: same seed, same probabilities."""
    torch.set_num_threads(1)
    data = load_data(**DATA)
    genotype = SPACE.sample(0)
    config = {"epochs": 1, "C": 4, "layers": 2, "batch_size": 32}
    job = {"kind": "member", "genotype": genotype.to_json(), "seed": 3, **config}
    member = _train_member_replicated(job, data, torch.device("cpu"), TorchReplicas(), {})
    single = train_member(genotype, data, config, seed=3)
    assert member.genotype == genotype and member.device_seconds > 0
    assert member.val_probs.shape == (len(data.val), 10) and member.val_probs.dtype == np.float16
    np.testing.assert_allclose(member.val_probs.astype(np.float32),
                               single.val_probs.astype(np.float32), atol=2e-3)
    assert set(member.metrics) == set(single.metrics)
    assert member.config["workers"] == 1


# One XNAS replica: its own process and a gloo group of two, as a Ray Train worker runs it.
XNAS_REPLICA = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from nestune.baselines.xnas import xnas_search
    from nestune.platform.data import load_data
    from nestune.platform.distributed import TorchReplicas
    rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        r = xnas_search(load_data("digits", subset=160), epochs=2, C=4, layers=3, batch_size=32,
                        seed=1, L=0.05, replicas=TorchReplicas())
        torch.save({"log_v": r.alphas, "weights": r.weights, "genotype": r.genotype.to_json(),
                    "removed": [e["removed"] for e in r.extra["wipeout"]],
                    "device_seconds": r.device_seconds, "workers": r.extra["workers"],
                    "batch": r.extra["per_worker_batch_size"]}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()
""")


def test_data_parallel_xnas_replicas_update_their_experts_identically(tmp_path):
    """Two replicas on different shards: the all-reduced rewards make every EG step and
    every wipeout the same on both, so they end with the same experts and genotype."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", XNAS_REPLICA, str(rank), str(port), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), outputs
    a, b = (torch.load(tmp_path / f"{rank}.pt") for rank in range(2))
    for x, y in zip(a["log_v"] + a["weights"], b["log_v"] + b["weights"], strict=True):
        assert torch.equal(x, y)  # -inf (wiped out) in the same places, the same numbers elsewhere
    assert a["removed"] == b["removed"] and sum(map(len, a["removed"])) > 0
    assert a["genotype"] == b["genotype"]
    SPACE.validate(Genotype.from_json(a["genotype"]))
    assert a["workers"] == 2 and a["batch"] == 16
    assert a["device_seconds"] == b["device_seconds"] > 0  # summed over both workers


def test_bad_arguments_name_the_field():
    from nestune.platform.distributed import run_job_distributed

    with pytest.raises(ValueError, match="workers"):
        run_job_distributed(SEARCH_JOB, DATA, workers=0, use_gpu=False)
    with pytest.raises(ValueError, match="job"):
        run_job_distributed({"kind": "other"}, DATA, workers=2, use_gpu=False)
    with pytest.raises(ValueError, match="data_spec"):
        run_job_distributed(SEARCH_JOB, "digits", workers=2, use_gpu=False)
