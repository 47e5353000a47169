"""``zonex monitor`` and ``zonex incident``: following the log, detecting abuse, responding."""
