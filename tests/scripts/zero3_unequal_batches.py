"""Run by tests/e2e/training/test_zero3.py through the deepspeed launcher (two ranks)."""
import os
import sys

import torch


def _evaluate_unequal_batches(argv: list[str]) -> None:
    """The launcher's script for the test above: both ZeRO stages evaluate the same model on batches
    of random tokens, 3 on rank 0 and 2 on rank 1; rank 0 prints ``NELBO <stage> <value>``."""
    import copy

    from pgm_dist.common.distributed import init_process_group, release_shared_memory
    from pgm_dist.training.config import parse_train_config
    from pgm_dist.training.engine import Engine
    from pgm_dist.training.setup import prepare_process

    setup = prepare_process(parse_train_config(argv))
    init_process_group(setup.device)
    torch.manual_seed(0)
    model, objective = setup.task.build(setup)
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, setup.model_config.vocab_size, (3, setup.model_config.seq_len), generator=generator)
               for _ in range(5)]
    mine = batches[:3] if setup.env.rank == 0 else batches[3:]
    for stage in (2, 3):
        ds_config = {**setup.ds_config, "zero_optimization": {"stage": stage}}
        engine = Engine(copy.deepcopy(model), objective, setup.cfg, ds_config, setup.env, setup.device)
        nelbo, _ = engine.evaluate(mine)
        if setup.env.is_main:
            print(f"NELBO {stage} {nelbo!r}", flush=True)
    # as a run ends (pgm_dist.training.session.run): every rank past its last collective before any exits
    release_shared_memory(setup.env)
    # Then out without interpreter finalisation: this script keeps two engines (a ZeRO-2 and a ZeRO-3 one,
    # with its hooks and partitioned parameters) alive to the end, and destroying them at exit aborted a
    # rank in CI ("terminate called without an active exception") after both results were printed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _evaluate_unequal_batches(sys.argv[1:])
