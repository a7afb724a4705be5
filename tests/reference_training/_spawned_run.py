"""What a ``torch.multiprocessing.spawn`` rank of ``test_distributed_run`` runs: kept apart from
the test module so that the spawned interpreters import only this and the CLI."""

import json


def worker(rank, world, port, args):
    """One spawned rank: the process group is initialised here, before the run, which then uses it
    as it is."""
    import torch.distributed as dist

    from reference_training.cli import main

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        code = main(list(args))
    finally:
        dist.destroy_process_group()
    if code != 0:
        raise SystemExit(code)


def spawn(port, args_json, world=2):
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, port, json.loads(args_json)), nprocs=world, join=True)
