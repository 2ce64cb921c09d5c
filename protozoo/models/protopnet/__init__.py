"""ProtoPNet (Chen et al., "This Looks Like That", NeurIPS 2019), one folder:

* :mod:`.model` -- the network, its loss terms, its staged schedule and its evidence metrics;
* :mod:`.push` -- prototype projection ("push") onto training patches, with provenance;
* :mod:`.prune` -- pruning (Chen et al.'s rule) and the class-specificity check.
"""
from .model import ProtoPNet, nearest_distances, protopnet_phases, squared_distances
from .prune import assess_prototypes, find_prunable, remove_prototypes
from .push import PushResult, apply_push, compute_push, nearest_images

__all__ = ["ProtoPNet", "squared_distances", "nearest_distances", "protopnet_phases",
           "PushResult", "compute_push", "apply_push", "nearest_images", "assess_prototypes",
           "find_prunable", "remove_prototypes"]
