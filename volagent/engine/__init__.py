"""The task engine: the durable journal of tasks, volume generations and reports, and the runner."""
