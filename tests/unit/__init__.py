"""volagent tests."""
