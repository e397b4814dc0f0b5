"""The engine: one thread owning the scheduler, the block manager and the runner. No torch."""
