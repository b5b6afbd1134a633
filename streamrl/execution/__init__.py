"""How a pipeline runs: the driver (:mod:`.main`), one process's stages (:mod:`.process`, the same code in the main
process, in worker processes and in replicas), the stage context (:mod:`.context`), streams for one process
(:mod:`.wiring`), worker processes (:mod:`.worker`) and the shared-memory bridge between processes (:mod:`.bridge`).
"""
