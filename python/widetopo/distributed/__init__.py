"""torch.distributed support: collectives that are no-ops in one process (collectives), the
pruning set the ranks' data form (data_split), the check that every rank runs the same pruning
(agreement), which rank owns which tensor (owners), and the global top-k over scores sharded
across ranks (sharded).
"""
