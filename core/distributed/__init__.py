"""Tensor parallelism (issue 14): the rank's context and collectives, how heads split over ranks, and
the vocabulary-parallel embedding (the model asks these for its shard; it never branches on the rank
count); joining the ranks, the per-step broadcast from rank 0, the other ranks' serving loop, which
ranks each process runs on one machine or several (`launch`: --nnodes / --node-rank, torchrun), and
the start and supervision of them (`rank_processes`, and `liveness` for ranks on other machines).
"""
