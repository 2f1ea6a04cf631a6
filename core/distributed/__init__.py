"""Tensor parallelism (issue 14): the rank's context and collectives, how heads split over ranks, and
the vocabulary-parallel embedding. The model asks these for its shard; it never branches on the rank count.
"""
