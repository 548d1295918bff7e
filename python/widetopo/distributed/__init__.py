"""torch.distributed support: collectives that are no-ops in one process (collectives), which
rank owns which tensor (owners), and the global top-k over scores sharded across ranks (sharded).
"""
