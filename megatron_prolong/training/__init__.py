"""Step, schedule, optimizer, checkpoint save/resume, logging."""
