"""Distributed states: tensor-parallel plans (`plan`), `fmodel.distribute` (`distribute`), sharded
loading and saving, and FSDP2 / torch.distributed.checkpoint over the facade."""
