"""Torch code both sides share: the layer files `flexorch prepare` (orchestrator/prepare.py) writes
and the workers read, and the weight compression prepare applies and the workers undo. Imported
lazily by the orchestrator (it imports no torch at module level) and never from workers/, so the
orchestrator reaches no worker module but the process entry points."""
