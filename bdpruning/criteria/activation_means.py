"""Old home of the mean activation, kept importable for one release: use :mod:`bdpruning.criteria.activation`."""

from .activation import ActivationMeans, ChannelRanking, rank_channels

__all__ = ["ActivationMeans", "ChannelRanking", "rank_channels"]
