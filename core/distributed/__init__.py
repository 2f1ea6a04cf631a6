"""Tensor parallelism (issue 14): the rank's context and collectives, how heads split over ranks, and
the vocabulary-parallel embedding (the model asks these for its shard; it never branches on the rank
count); joining the ranks, the per-step broadcast from rank 0, the other ranks' serving loop, and rank
0's launch and supervision of them (`tgserve serve --num-shard N`).
"""
